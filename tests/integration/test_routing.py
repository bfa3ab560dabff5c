"""Routing jobs to worker classes through the API, with no worker running: a job goes to the
queue of the smallest registered worker class that fits it, or to the one its body names
(`resources.queue`, checked against the live workers' queues), or to `train` when nothing
could be checked; its message lands on that queue, now and when it is resumed."""

import pytest
from sqlalchemy import update

from afina.jobs.planning import FIT_SHARE
from afina.jobs.queue import TRAIN_QUEUE
from afina.models import Job, JobEvent, Worker
from afina.models.base import utcnow
from tests.support import assert_error, register_worker, rows, take_messages

QUEUES = ("train", "train-tiny", "train-24g", "train-80g")


def body(model: str, training_file: str, **extra) -> dict:
    """A job whose run needs the same memory on any GPU: one batch size, checkpointing on."""
    return {
        "model": model,
        "training_file": training_file,
        "hyperparameters": {"n_epochs": 1, "batch_size": 2},
        "training": {"gradient_checkpointing": True},
        **extra,
    }


def messages_by_queue(client) -> dict[str, list[str]]:
    found = {queue: take_messages(client.app.state.celery, queue) for queue in QUEUES}
    return {queue: job_ids for queue, job_ids in found.items() if job_ids}


def events(settings, job_id: str) -> list[str]:
    listed = sorted(
        (event for event in rows(settings, JobEvent) if event.job_id == job_id),
        key=lambda event: event.created_at,
    )
    return [event.message for event in listed]


@pytest.fixture
def needs(client, model, training_file) -> int:
    """What the run needs on a GPU, as the estimate says with no worker registered."""
    response = client.post("/v1/fine_tuning/jobs/estimate", json=body(model, training_file))
    assert response.status_code == 200, response.text
    plan = response.json()
    assert (plan["fits"]["checked"], plan["queue"]) == (False, TRAIN_QUEUE)
    return plan["memory"]["total"]


@pytest.fixture
def classes(client, needs) -> None:
    """Three worker classes: one too small for the run, an L4 that fits it, and an H100 that
    also takes the L4's queue (a large worker helping the smaller class)."""
    fitting = int(needs / FIT_SHARE) + 1
    with client.app.state.session_factory.begin() as db:
        register_worker(db, "tiny", memory_total=needs // 2, queues=["train-tiny", "train"])
        register_worker(db, "l4", memory_total=fitting, queues=["train-24g", "train"])
        register_worker(
            db,
            "h100",
            memory_total=4 * needs,
            name="NVIDIA H100",
            queues=["train-80g", "train-24g", "train"],
        )


def create(client, sent: dict) -> dict:
    response = client.post("/v1/fine_tuning/jobs", json=sent)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_job_goes_to_the_queue_of_the_smallest_worker_class_that_fits_it(
    client, settings, model, training_file, classes
):
    sent = body(model, training_file)
    plan = client.post("/v1/fine_tuning/jobs/estimate", json=sent).json()
    assert (plan["fits"]["workers"], plan["queue"]) == (["l4", "h100"], "train-24g")

    job = create(client, sent)

    assert job["queue"] == "train-24g"
    (row,) = rows(settings, Job)
    assert row.queue == "train-24g"
    first = events(settings, job["id"])
    assert first[0].startswith("Validated training file")
    assert first[1].startswith("Checked: needs ")
    assert first[2:] == ["Queued on train-24g: the smallest worker class that fits", "Job queued"]
    assert messages_by_queue(client) == {"train-24g": [job["id"]]}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["queue"] == "train-24g"


def test_a_job_asking_for_more_gpus_than_any_live_worker_has_is_refused(
    client, settings, model, training_file, classes
):
    sent = body(model, training_file, resources={"gpus": 2})
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=sent), 400, "resources.gpus", "does_not_fit"
    )
    assert (
        "asks for 2 GPUs of one node, and the live workers' nodes have at most 1"
        in (error["message"])
    )
    assert rows(settings, Job) == []
    with client.app.state.session_factory.begin() as db:
        register_worker(db, "node", memory_total=80 * 2**30, queues=("train-multi",), ranks=4)
    job = create(client, sent)
    assert (job["queue"], job["config"]["resources"]) == ("train-multi", {"gpus": 2})


def test_a_job_may_name_the_queue_of_a_live_worker_class(
    client, settings, model, training_file, classes
):
    sent = body(model, training_file, resources={"queue": "train-80g"})
    plan = client.post("/v1/fine_tuning/jobs/estimate", json=sent).json()
    assert (plan["fits"]["workers"], plan["queue"]) == (["h100"], "train-80g")

    job = create(client, sent)

    assert job["queue"] == "train-80g"
    assert "Queued on train-80g: the queue resources.queue names" in events(settings, job["id"])
    assert messages_by_queue(client) == {"train-80g": [job["id"]]}
    # `train`, which every class takes, too: planned on the smallest that fits.
    default = create(client, body(model, training_file, resources={"queue": "train"}))
    assert default["queue"] == "train"
    assert messages_by_queue(client) == {"train": [default["id"]]}


@pytest.mark.parametrize("queue", ["train-40g", "export"])
def test_a_queue_no_live_worker_takes_is_refused_naming_resources_queue(
    client, settings, model, training_file, classes, queue
):
    sent = body(model, training_file, resources={"queue": queue})
    created = client.post("/v1/fine_tuning/jobs", json=sent)
    error = assert_error(created, 400, "resources.queue", "unknown_queue")
    assert repr(queue) in error["message"]
    estimated = client.post("/v1/fine_tuning/jobs/estimate", json=sent)
    assert estimated.json() == created.json()
    assert rows(settings, Job) == []
    assert messages_by_queue(client) == {}


def test_a_queue_whose_workers_all_went_silent_is_refused(
    client, settings, model, training_file, classes
):
    old = utcnow().replace(year=2000)
    with client.app.state.session_factory.begin() as db:
        db.execute(update(Worker).where(Worker.id == "h100").values(heartbeat_at=old))
    sent = body(model, training_file, resources={"queue": "train-80g"})
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=sent), 400, "resources.queue", "unknown_queue"
    )
    assert "train-24g, train-tiny" in error["message"]  # what the live workers take


def test_a_queue_whose_workers_are_too_small_is_refused_naming_it(
    client, settings, model, training_file, classes
):
    sent = body(model, training_file, resources={"queue": "train-tiny"})
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=sent), 400, "resources.queue", "does_not_fit"
    )
    assert "fits no worker on queue 'train-tiny'" in error["message"]
    assert "It fits a worker on queue 'train-24g'" in error["message"]
    assert rows(settings, Job) == []
    plan = client.post("/v1/fine_tuning/jobs/estimate", json=sent).json()
    assert (plan["fits"]["workers"], plan["queue"]) == ([], None)
    assert "the largest worker on queue train-tiny" in plan["fits"]["reason"]


def test_with_no_worker_registered_only_the_default_queue_is_taken(
    client, settings, model, training_file
):
    named = body(model, training_file, resources={"queue": "train-80g"})
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=named), 400, "resources.queue", "unknown_queue"
    )
    assert "No worker is registered yet" in error["message"]
    assert rows(settings, Job) == []

    default = create(client, body(model, training_file, resources={"queue": "train"}))
    unnamed = create(client, body(model, training_file))

    assert (default["queue"], unnamed["queue"]) == ("train", "train")
    assert "Queued on train: the default queue (no worker class was checked)" in events(
        settings, unnamed["id"]
    )
    assert messages_by_queue(client) == {"train": [default["id"], unnamed["id"]]}


def test_a_job_that_could_not_be_checked_goes_to_the_default_queue(
    client, settings, training_file, classes
):
    """A hub model not downloaded here: its size is not known, nor which class fits it."""
    job = create(client, body("org/not-downloaded", training_file))
    assert job["queue"] == TRAIN_QUEUE
    assert messages_by_queue(client) == {"train": [job["id"]]}
    named = create(
        client, body("org/not-downloaded", training_file, resources={"queue": "train-80g"})
    )
    assert named["queue"] == "train-80g"
    assert messages_by_queue(client) == {"train-80g": [named["id"]]}


def test_a_resumed_job_goes_back_to_its_queue(client, settings, model, training_file, classes):
    job = create(client, body(model, training_file))
    assert messages_by_queue(client) == {"train-24g": [job["id"]]}
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").status_code == 200
    resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["queue"] == "train-24g"
    assert messages_by_queue(client) == {"train-24g": [job["id"]]}


@pytest.mark.parametrize(
    ("resources", "param"),
    [
        ({"queue": "train 80g"}, "resources.queue"),
        ({"queue": "x" * 65}, "resources.queue"),
        ({"queue": 80}, "resources.queue"),
        ({"gpus": 0}, "resources.gpus"),
        ({"gpus": 1.5}, "resources.gpus"),
        ("train-80g", "resources"),
    ],
)
def test_bad_resources_are_refused_naming_the_field(
    client, settings, model, training_file, resources, param
):
    sent = body(model, training_file, resources=resources)
    assert_error(client.post("/v1/fine_tuning/jobs", json=sent), 400, param)
    assert rows(settings, Job) == []
