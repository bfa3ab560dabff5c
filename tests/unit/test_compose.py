"""The compose file, checked statically (no Docker engine here): every afina service gets the
shared settings (database, broker, object store), the workers reserve distinct GPUs, every
file it mounts exists, and Prometheus scrapes the API where the compose network has it."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
AFINA = {name for name, service in SERVICES.items() if service.get("image") == "afina:gpu"}
WORKERS = {name for name in AFINA if SERVICES[name]["command"][:2] == ["afina", "worker"]}


def test_every_afina_service_shares_the_database_broker_and_store():
    assert {"api", "migrate", "worker", "worker-multi"} <= AFINA
    for name in AFINA:
        environment = SERVICES[name]["environment"]
        assert environment["AFINA_DATABASE_URL"].startswith("postgresql://"), name
        assert environment["AFINA_BROKER_URL"] == "redis://redis:6379/0", name
        assert environment["AFINA_STORAGE_URL"].startswith("s3://afina/"), name
        assert environment["AFINA_S3_ENDPOINT_URL"] == "http://minio:9000", name


def test_the_workers_reserve_distinct_gpus_and_wait_for_the_store():
    one_gpu = [
        SERVICES[name]["deploy"]["resources"]["reservations"]["devices"][0]
        for name in sorted(WORKERS - {"worker-multi"})
    ]
    ids = [device["device_ids"][0] for device in one_gpu]
    assert ids == ["${AFINA_WORKER_GPU:-0}", "1", "2", "3"]
    multi = SERVICES["worker-multi"]
    assert multi["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert multi["environment"]["AFINA_WORKER_QUEUES"].split(",")[0] == "train-multi"
    for name in WORKERS | {"api"}:
        needs = SERVICES[name]["depends_on"]
        assert needs["minio-setup"]["condition"] == "service_completed_successfully", name
        assert needs["migrate"]["condition"] == "service_completed_successfully", name


def test_mounted_files_and_volumes_exist():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)


def test_prometheus_scrapes_the_api_on_the_compose_network():
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    assert "api" in SERVICES["prometheus"]["depends_on"]
