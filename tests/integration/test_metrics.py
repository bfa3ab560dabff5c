"""`GET /metrics`: every family appears in the Prometheus text format with the values and
labels of what the app answered and of the rows in the database (jobs, metric points,
workers) and the messages on the broker; it needs no key and names no project's object."""

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from afina.api.app import create_app
from afina.jobs.queue import EXPORT_QUEUE, TRAIN_QUEUE, TRAIN_TASK
from afina.models import JobMetric, JobStatus, Worker
from afina.models.base import utcnow
from tests.conftest import NoReconciler
from tests.support import LOCAL, add_rows, job_row

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of `/metrics`, by name and labels; the text is checked as it is parsed."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of one name, by their labels."""
    return {labels: found for (sample, labels), found in samples.items() if sample == name}


def requests(samples: Samples, route: str, method: str, status: int) -> float | None:
    return value(
        samples, "afina_http_requests_total", route=route, method=method, status=str(status)
    )


def test_http_requests_are_counted_and_timed_by_route_template(client):
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    for job_id in ("ftjob-aaa", "ftjob-bbb"):
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404
    assert client.get("/v1/models/ft:x:y:z:1").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    assert client.post("/healthz").status_code == 405
    assert client.request("BREW", "/healthz").status_code == 405

    samples = scrape(client)
    assert requests(samples, "/healthz", "GET", 200) == 3
    # one series for both ids, by the route's template (no converter in it)
    assert requests(samples, "/v1/fine_tuning/jobs/{job_id}", "GET", 404) == 2
    assert requests(samples, "/v1/models/{model}", "GET", 404) == 1
    assert requests(samples, "unmatched", "GET", 404) == 1
    assert requests(samples, "/healthz", "POST", 405) == 1
    assert requests(samples, "/healthz", "other", 405) == 1
    routes = {dict(labels)["route"] for labels in named(samples, "afina_http_requests_total")}
    assert not any("ftjob-" in route for route in routes)

    labels = {"route": "/healthz", "method": "GET", "status": "200"}
    assert value(samples, "afina_http_request_duration_seconds_count", **labels) == 3
    assert 0 < value(samples, "afina_http_request_duration_seconds_sum", **labels) < 30
    assert value(samples, "afina_http_request_duration_seconds_bucket", le="+Inf", **labels) == 3
    # the scrape counts itself from the next one on
    again = scrape(client)
    assert requests(again, "/metrics", "GET", 200) == 1


@pytest.fixture
def keyed_client(make_settings) -> Any:
    app = create_app(make_settings(api_keys=["alpha:key-a"]))
    app.state.reconciler = NoReconciler()
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def test_requests_refused_before_routing_are_labelled_with_their_route(keyed_client):
    assert keyed_client.get("/v1/fine_tuning/jobs/ftjob-abc").status_code == 401
    assert keyed_client.post("/v1/fine_tuning/jobs/estimate").status_code == 401
    assert keyed_client.get("/v1/nothing-here").status_code == 401
    assert keyed_client.get("/static/dashboard.js").status_code == 200

    samples = scrape(keyed_client)  # with no key: Prometheus sends none
    assert requests(samples, "/v1/fine_tuning/jobs/{job_id}", "GET", 401) == 1
    # the route that takes the method, not the first whose path matches
    assert requests(samples, "/v1/fine_tuning/jobs/estimate", "POST", 401) == 1
    assert requests(samples, "unmatched", "GET", 401) == 1
    assert requests(samples, "/static/{path}", "GET", 200) == 1


def ago(seconds: float):
    return utcnow() - timedelta(seconds=seconds)


@pytest.mark.both_backends  # run times are each database's own date arithmetic
def test_jobs_by_status_outcomes_and_durations(client, settings):
    add_rows(
        settings,
        job_row(status=JobStatus.QUEUED),
        job_row(status=JobStatus.QUEUED),
        job_row(status=JobStatus.RUNNING, started_at=ago(50), worker="gpu-0"),
        job_row(status=JobStatus.PAUSED, started_at=ago(500)),
        job_row(status=JobStatus.SUCCEEDED, started_at=ago(1000), finished_at=ago(880)),
        job_row(status=JobStatus.SUCCEEDED, started_at=ago(9000), finished_at=ago(5000)),
        job_row(status=JobStatus.FAILED, started_at=ago(100), finished_at=ago(70)),
        # cancelled before it started: an outcome, but no run time
        job_row(status=JobStatus.CANCELLED, finished_at=ago(10)),
    )
    samples = scrape(client)

    assert named(samples, "afina_jobs") == {
        frozenset({("status", status.value)}): count
        for status, count in {
            JobStatus.VALIDATING_FILES: 0,
            JobStatus.QUEUED: 2,
            JobStatus.RUNNING: 1,
            JobStatus.PAUSED: 1,
            JobStatus.SUCCEEDED: 2,
            JobStatus.FAILED: 1,
            JobStatus.CANCELLED: 1,
        }.items()
    }
    finished = {"succeeded": 2, "failed": 1, "cancelled": 1}
    for outcome, count in finished.items():
        assert value(samples, "afina_jobs_finished_total", outcome=outcome) == count

    def bucket(outcome: str, le: str) -> float | None:
        return value(samples, "afina_job_duration_seconds_bucket", outcome=outcome, le=le)

    # succeeded: 120 s and 4000 s
    assert value(samples, "afina_job_duration_seconds_count", outcome="succeeded") == 2
    assert value(samples, "afina_job_duration_seconds_sum", outcome="succeeded") == pytest.approx(
        4120, abs=1
    )
    assert [bucket("succeeded", le) for le in ("60.0", "300.0", "3600.0", "7200.0", "+Inf")] == [
        0,
        1,
        1,
        2,
        2,
    ]
    assert [bucket("failed", le) for le in ("60.0", "+Inf")] == [1, 1]
    assert value(samples, "afina_job_duration_seconds_count", outcome="cancelled") == 0
    assert bucket("cancelled", "+Inf") == 0


@pytest.mark.both_backends  # correlated subqueries on the metric points' key
def test_training_rate_and_step_time_of_each_running_jobs_worker(client, settings):
    start = ago(100)
    running = job_row(status=JobStatus.RUNNING, started_at=start, worker="gpu-0")
    fresh = job_row(status=JobStatus.RUNNING, started_at=start, worker="gpu-1")
    no_points = job_row(status=JobStatus.RUNNING, started_at=start, worker="gpu-2")
    done = job_row(status=JobStatus.SUCCEEDED, started_at=start, finished_at=ago(1), worker="gpu-3")
    points = [
        # gpu-0: steps 8 and 10 are older; 12 is 3 s after 10: 1.5 s a step
        *(
            JobMetric(job_id=running.id, step=step, tokens_per_second=rate, at=start + at)
            for step, rate, at in (
                (8, 900.0, timedelta(seconds=1)),
                (10, 1000.0, timedelta(seconds=10)),
                (12, 1500.0, timedelta(seconds=13)),
            )
        ),
        JobMetric(job_id=fresh.id, step=1, tokens_per_second=250.0, at=start),
        JobMetric(job_id=done.id, step=1, tokens_per_second=5.0, at=start),
        JobMetric(job_id=done.id, step=2, tokens_per_second=5.0, at=ago(2)),
    ]
    add_rows(settings, running, fresh, no_points, done, *points)
    samples = scrape(client)

    assert named(samples, "afina_training_tokens_per_second") == {
        frozenset({("worker", "gpu-0")}): 1500.0,
        frozenset({("worker", "gpu-1")}): 250.0,  # one point: a rate, no step time yet
    }
    assert named(samples, "afina_training_step_seconds") == {
        frozenset({("worker", "gpu-0")}): pytest.approx(1.5),
    }


def worker_row(worker_id: str, *, seen: float = 0, **values: Any) -> Worker:
    defaults = {
        "id": worker_id,
        "hostname": "gpu-host",
        "queue": TRAIN_QUEUE,
        "device_kind": "cuda",
        "device_name": "NVIDIA L4",
        "memory_total": 24 * 2**30,
        "memory_free": 20 * 2**30,
        "cpu_cores": 8,
        "started_at": ago(seen + 60),
        "heartbeat_at": ago(seen),
        "throughput": {},
    }
    return Worker(**{**defaults, **values})


def test_live_workers_with_their_device_memory(client, settings):
    add_rows(
        settings,
        worker_row("host-a:1"),
        worker_row(
            "host-b:2",
            hostname="cpu-host",
            device_kind="cpu",
            device_name="cpu",
            memory_total=64 * 2**30,
            memory_free=60 * 2**30,
        ),
        worker_row("host-c:3", seen=settings.worker_timeout_seconds + 60),  # silent: not live
    )
    samples = scrape(client)

    assert named(samples, "afina_worker_up") == {
        frozenset(
            {
                ("worker", "host-a:1"),
                ("hostname", "gpu-host"),
                ("queues", TRAIN_QUEUE),
                ("device_kind", "cuda"),
                ("device_name", "NVIDIA L4"),
            }
        ): 1,
        frozenset(
            {
                ("worker", "host-b:2"),
                ("hostname", "cpu-host"),
                ("queues", TRAIN_QUEUE),
                ("device_kind", "cpu"),
                ("device_name", "cpu"),
            }
        ): 1,
    }
    memory = {
        "afina_worker_memory_total_bytes": {"host-a:1": 24 * 2**30, "host-b:2": 64 * 2**30},
        "afina_worker_memory_free_bytes": {"host-a:1": 20 * 2**30, "host-b:2": 60 * 2**30},
    }
    kinds = {"host-a:1": "cuda", "host-b:2": "cpu"}
    for name, by_worker in memory.items():
        assert named(samples, name) == {
            frozenset({("worker", worker), ("device_kind", kinds[worker])}): found
            for worker, found in by_worker.items()
        }


def test_queue_depth_on_the_broker_for_each_queue(client, settings):
    celery = client.app.state.celery
    for job_id in ("ftjob-1", "ftjob-2"):
        celery.send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)
    add_rows(settings, worker_row("host-a:1", queue=f"train-80g,{TRAIN_QUEUE}"))
    samples = scrape(client)

    assert value(samples, "afina_broker_up") == 1
    assert value(samples, "afina_database_up") == 1
    assert named(samples, "afina_queue_messages") == {
        frozenset({("queue", TRAIN_QUEUE)}): 2,
        frozenset({("queue", EXPORT_QUEUE)}): 0,
        frozenset({("queue", "train-80g")}): 0,  # a queue a live worker takes
    }


def test_a_broker_that_is_down_leaves_only_its_families_out(make_settings):
    # Nothing listens on port 1: the connection is refused at once.
    app = create_app(make_settings(broker_url="redis://127.0.0.1:1/0"))
    app.state.reconciler = NoReconciler()
    with TestClient(app, base_url=LOCAL) as client:
        samples = scrape(client)
    assert value(samples, "afina_broker_up") == 0
    assert named(samples, "afina_queue_messages") == {}
    assert value(samples, "afina_database_up") == 1
    assert value(samples, "afina_jobs", status="queued") == 0


def test_the_generation_and_process_families_are_shown_too(client):
    samples = scrape(client)
    for outcome in ("stop", "length", "error", "cancelled", "rejected"):
        assert value(samples, "afina_generation_requests_total", outcome=outcome) is not None
    for name in (
        "afina_generation_tokens_total",
        "afina_generation_time_to_first_token_seconds_count",
        "afina_generation_time_per_output_token_seconds_count",
        "afina_generation_batch_size_count",
        "afina_adapter_cache_hits_total",
        "afina_adapter_cache_misses_total",
        "afina_adapter_cache_evictions_total",
        "process_cpu_seconds_total",
    ):
        assert value(samples, name) is not None, name


def test_metrics_need_no_key_and_name_no_projects_object(keyed_client, settings):
    job = job_row(
        project="alpha",
        status=JobStatus.RUNNING,
        started_at=ago(10),
        worker="host-a:1",
        suffix="secret-suffix",
        fine_tuned_model="ft:org/base-model:alpha:secret-suffix:abcdefgh",
    )
    add_rows(
        settings,
        job,
        JobMetric(job_id=job.id, step=1, tokens_per_second=1.0, at=ago(5)),
        worker_row("host-a:1"),
    )
    assert keyed_client.get(f"/v1/fine_tuning/jobs/{job.id}").status_code == 401
    response = keyed_client.get("/metrics")
    assert response.status_code == 200
    for secret in (job.id, job.id.removeprefix("ftjob-"), "alpha", "secret-suffix", "file-abc"):
        assert secret not in response.text
    assert 'worker="host-a:1"' in response.text  # the operator's names are shown
    assert "/v1/fine_tuning/jobs/{job_id}" in response.text


DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "afina-dashboard.json"


def test_the_grafana_dashboard_plots_only_families_that_are_served(client):
    response = client.get("/metrics")
    served = set()
    for family in text_string_to_metric_families(response.text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        served |= {family.name + suffix for suffix in suffixes}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    plotted = {name for expr in expressions for name in re.findall(r"\bafina_\w+", expr)}
    assert len(plotted) > 20
    assert plotted <= served, sorted(plotted - served)
