"""`afina serve` as a user runs it (embedded default: SQLite, the SQLite broker and the
artifacts all in the data dir), its data dir on a small tmpfs that fills up while a job
trains, then gets its space back: clients get a 507 for what cannot be stored and a 503 from
/readyz naming storage, a file can still be deleted, and once the space is back the job
finishes and a new one runs, on the same worker, with no restart."""

from pathlib import Path

import httpx

from afina.core.disk import MiB
from tests.e2e.test_serve_recovery import (
    job,
    metric_steps,
    serve,
    the_worker,
    wait_for_status,
)
from tests.e2e.test_training import arithmetic, create_job, upload_id
from tests.e2e.test_worker_shutdown import wait_until
from tests.support import child_pids, fill_disk, small_disk

STEPS = 24  # a metric point for every step, a checkpoint every 6


def log(workdir: Path, *, whole: bool = False) -> str:
    text = (workdir / "serve.log").read_text(errors="replace")
    return text if whole else text[-6000:]


def new_job(api: httpx.Client, model: Path, steps: int = STEPS) -> str:
    return create_job(
        api,
        model=str(model),
        training_file=upload_id(api, arithmetic(64, seed=8)),
        seed=4,
        hyperparameters={"batch_size": 4},
        training={"max_steps": steps, "save_steps": 6},
    )["id"]


def test_serve_gets_over_a_full_disk_by_itself(tmp_path, demo_model):
    limits = {"AFINA_MIN_FREE_BYTES": str(8 * MiB), "AFINA_DISK_RESERVE_BYTES": str(2 * MiB)}
    with (
        small_disk(tmp_path / "data", "64m") as data,
        serve(tmp_path, **limits) as (api, serve_pid),
    ):
        worker = the_worker(serve_pid, tmp_path)
        spare = upload_id(api, arithmetic(512, seed=3))
        job_id = new_job(api, demo_model)
        wait_until(
            lambda: job(api, job_id)["progress"]["steps_done"] >= 3,
            120,
            f"the job never reached step 3:\n{log(tmp_path)}",
        )

        # The job training meanwhile frees a little now and then: fill the disk again until
        # an upload meets it full (an upload that found room is deleted).
        for _ in range(5):
            filler = fill_disk(data)
            refused = api.post(
                "/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": ("more.jsonl", arithmetic(8, seed=4))},
            )
            if refused.status_code != 200:
                break
            api.delete(f"/v1/files/{refused.json()['id']}")
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "insufficient_storage"
        ready = api.get("/readyz")
        assert ready.status_code == 503
        # Full, or nearly: the job may have freed a little since. The integration test
        # tests/integration/test_full_disk.py pins each message.
        storage = ready.json()["checks"]["storage"]
        assert storage == "not writable: the disk is full" or storage.startswith("nearly full: "), (
            storage
        )
        deleted = api.delete(f"/v1/files/{spare}")
        assert deleted.status_code == 200, deleted.text

        # Full again, what the delete freed included: the job's writes meet it and wait. Its
        # heartbeat fails each second; its other writes retry, unless a checkpoint met the
        # first fill and the run already waits for space.
        seen = len(log(tmp_path, whole=True))
        fill_disk(data)
        failing = f"heartbeat of {job_id} failed: the disk is full"
        wait_until(
            lambda: failing in log(tmp_path, whole=True)[seen:],
            60,
            f"the job's writes never met the full disk:\n{log(tmp_path)}",
        )
        filler.unlink()  # the space comes back
        final = wait_for_status(api, job_id, tmp_path, "succeeded", "failed", "cancelled")
        assert final["status"] == "succeeded", final["error"]
        assert final["progress"]["steps_done"] == STEPS
        assert metric_steps(api, job_id) == list(range(1, STEPS + 1))

        second = new_job(api, demo_model, steps=2)
        final = wait_for_status(api, second, tmp_path, "succeeded", "failed", "cancelled")
        assert final["status"] == "succeeded", final["error"]
        assert child_pids(serve_pid) == [worker]  # the same worker took both: no restart
        assert api.get("/readyz").status_code == 200
