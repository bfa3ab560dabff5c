"""Routing jobs to worker classes: the queue a plan picks (the smallest worker class that fits,
or the one the request names), the `resources` section of a job body, the queues a worker
takes (AFINA_WORKER_QUEUES, `afina worker --queues`) and where Celery sends a job's message."""

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from afina.core.estimate import ModelShape
from afina.core.job_config import ConfigRequest, ResourceSettings, resolve_config
from afina.core.settings import Settings, get_settings, parse_worker_queues
from afina.jobs import planning
from afina.jobs.planning import FIT_SHARE, Dataset, plan, route
from afina.jobs.queue import EXPORT_QUEUE, EXPORT_TASK, TRAIN_QUEUE, TRAIN_TASK, training_queues
from afina.jobs.workers import queues_of, taking
from afina.models import Worker
from tests.unit.test_job_config import only_error

SHAPE = ModelShape(
    hidden=256,
    layers=2,
    vocabulary=1000,
    intermediate=1024,
    heads=4,
    kv_heads=4,
    head_dim=64,
    tied_embeddings=False,
)
DATA = Dataset(lengths=[100] * 8, counted=True)
# One choice only (batch size and checkpointing given): the run needs the same on any GPU.
CONFIG = resolve_config(
    ConfigRequest.model_validate(
        {"hyperparameters": {"batch_size": 2}, "training": {"gradient_checkpointing": True}}
    ),
    num_examples=8,
    model_max_length=512,
)


def needed() -> int:
    """What the run needs on a GPU."""
    return plan(SHAPE, CONFIG, DATA, [], auto_batch=False).memory.total


def worker(worker_id: str, memory_total: int, queue: str) -> Worker:
    return Worker(
        id=worker_id,
        hostname="gpu-host",
        queue=queue,
        device_kind="cuda",
        device_name="GPU",
        memory_total=memory_total,
        memory_free=memory_total,
        cpu_cores=8,
        max_ranks=1,
        throughput={},
    )


def classes(total: int) -> list[Worker]:
    """Three worker classes, smallest memory first as the registry lists them: one too small
    for the run, two it fits."""
    return [
        worker("tiny", int(total / FIT_SHARE) // 2, "train-tiny,train"),
        worker("small", int(total / FIT_SHARE) + 1, "train-small,train"),
        worker("large", 4 * total, "train-large,train-small,train"),
    ]


# --- the queue a plan picks ---------------------------------------------------------------------


def test_a_job_goes_to_the_first_queue_of_the_smallest_worker_that_fits_it():
    workers = classes(needed())
    chosen = plan(SHAPE, CONFIG, DATA, workers, auto_batch=False)
    assert chosen.fits.workers == ["small", "large"]
    assert chosen.queue == "train-small"
    # Without the small class, the large one's own queue.
    assert plan(SHAPE, CONFIG, DATA, [workers[0], workers[2]], auto_batch=False).queue == (
        "train-large"
    )


def test_a_named_queue_plans_on_the_workers_that_take_it_alone():
    workers = classes(needed())
    chosen = plan(SHAPE, CONFIG, DATA, workers, auto_batch=False, queue="train-large")
    assert (chosen.fits.workers, chosen.queue) == (["large"], "train-large")
    # `train` is every class's: planned on the smallest that fits, sent to `train` itself.
    default = plan(SHAPE, CONFIG, DATA, workers, auto_batch=False, queue="train")
    assert (default.fits.workers, default.queue) == (["small", "large"], "train")


def test_a_named_queue_whose_workers_are_too_small_fits_none_and_says_where():
    workers = classes(needed())
    refused = plan(SHAPE, CONFIG, DATA, workers, auto_batch=False, queue="train-tiny")
    assert (refused.fits.checked, refused.fits.workers, refused.queue) == (True, [], None)
    assert refused.fits.reason is not None
    assert "the largest worker on queue train-tiny (GPU) has" in refused.fits.reason


def test_auto_settings_are_planned_on_the_named_queue_s_workers():
    """batch_size "auto" is the largest batch the smallest worker of the queue takes."""
    request = ConfigRequest.model_validate({"training": {"gradient_checkpointing": False}})
    config = resolve_config(request, num_examples=8, model_max_length=512)
    one = plan(SHAPE, config, DATA, [], auto_batch=True).memory.total  # batch 4: the most
    small = worker("small", int(one / 2 / FIT_SHARE), "train-small,train")
    large = worker("large", 8 * one, "train-large,train")
    anywhere = plan(SHAPE, config, DATA, [small, large], auto_batch=True)
    on_large = plan(SHAPE, config, DATA, [small, large], auto_batch=True, queue="train-large")
    assert anywhere.queue == "train-small"
    assert anywhere.settings.batch_size < 4
    assert (on_large.queue, on_large.settings.batch_size) == ("train-large", 4)


def test_with_no_worker_the_job_goes_to_the_default_queue_or_the_named_one():
    assert plan(SHAPE, CONFIG, DATA, [], auto_batch=False).queue == TRAIN_QUEUE
    assert route(None, None, checked=False) == TRAIN_QUEUE
    assert route(None, "train", checked=False) == "train"


def test_a_job_that_fits_no_worker_has_no_queue():
    too_small = [worker("tiny", needed() // 2, "train-tiny,train")]
    assert plan(SHAPE, CONFIG, DATA, too_small, auto_batch=False).queue is None
    assert route(None, "train-tiny", checked=True) is None


def test_a_worker_row_without_queues_routes_to_the_default_queue():
    assert route(worker("old", 2**40, ""), None, checked=True) == TRAIN_QUEUE


def test_the_registry_row_lists_a_worker_s_training_queues_in_its_order():
    rows = [worker("a", 1, "train-80g,train"), worker("b", 2, "train")]
    assert queues_of(rows[0]) == ["train-80g", "train"]
    assert [row.id for row in taking(rows, "train")] == ["a", "b"]
    assert [row.id for row in taking(rows, "train-80g")] == ["a"]
    assert taking(rows, "train-80") == []  # whole names only
    assert planning.queues_of is queues_of


# --- the job body's `resources` ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "train-80g", "a100_40gb.spot", "x" * 64])
def test_resources_queue_takes_a_queue_name(name):
    request = ConfigRequest.model_validate({"resources": {"queue": name}})
    assert request.resources == ResourceSettings(queue=name)
    # The queue is stored on the job, not in the resolved config the trainer runs.
    config = resolve_config(request, num_examples=8, model_max_length=None)
    assert "queue" not in config.model_dump().get("resources", {})


def test_resources_default_to_no_queue():
    assert ConfigRequest.model_validate({}).resources.queue is None
    assert ConfigRequest.model_validate({"resources": {}}).resources.queue is None


@pytest.mark.parametrize(
    "value",
    ["", "x" * 65, "train 80g", "train,train-80g", "queue/1", "train\n", "träin", 80, True],
)
def test_resources_queue_refuses_anything_else_by_name(value):
    error = only_error({"resources": {"queue": value}})
    assert error["loc"] == ("resources", "queue")


def test_resources_refuse_an_unknown_key_by_name():
    error = only_error({"resources": {"queue": "train", "nodes": 2}})
    assert (error["loc"], error["type"]) == (("resources", "nodes"), "extra_forbidden")
    error = only_error({"resources": "train-80g"})
    assert error["loc"] == ("resources",)


def test_the_job_schema_documents_resources():
    schema = ConfigRequest.model_json_schema()
    resources = schema["$defs"]["ResourceSettings"]
    assert resources["additionalProperties"] is False
    queue = resources["properties"]["queue"]["anyOf"][0]
    assert queue == {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"}


# --- the queues a worker takes ------------------------------------------------------------------


def test_worker_queues_take_any_queue_name_in_order_each_once(monkeypatch, tmp_path):
    monkeypatch.setenv("AFINA_WORKER_QUEUES", " train-80g,train , export,train-80g")
    settings = Settings(_env_file=None, data_dir=tmp_path)
    assert settings.worker_queues == ["train-80g", "train", "export"]
    assert training_queues(settings.worker_queues) == ["train-80g", "train"]
    assert training_queues([EXPORT_QUEUE]) == []
    monkeypatch.delenv("AFINA_WORKER_QUEUES")
    assert Settings(_env_file=None).worker_queues == ["train", "export"]  # unset: both kinds


@pytest.mark.parametrize(
    "value", ["train 80g", "a/b", ",", "x" * 65, ",".join("q" * n for n in range(1, 18))]
)
def test_worker_queues_refuse_a_bad_name_or_too_many(monkeypatch, value):
    monkeypatch.setenv("AFINA_WORKER_QUEUES", value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
    with pytest.raises(ValidationError):
        parse_worker_queues(value)


def test_parse_worker_queues_as_the_environment_takes_them():
    assert parse_worker_queues("train-80g, train,train-80g") == ["train-80g", "train"]


@pytest.fixture
def worker_command(monkeypatch, tmp_path):
    """`afina worker` with its Celery worker replaced by one that notes the queues it would
    take; the environment and the settings' cache are put back afterwards."""
    import afina.worker.celery_app as celery_app
    from afina.cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AFINA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AFINA_WORKER_QUEUES", "train")
    taken: list[list[str]] = []
    monkeypatch.setattr(
        celery_app, "run_worker", lambda: taken.append(get_settings().worker_queues)
    )
    get_settings.cache_clear()

    def run(*args: str):
        return CliRunner().invoke(app, ["worker", *args]), taken

    yield run
    get_settings.cache_clear()


def test_afina_worker_queues_overrides_the_environment(worker_command):
    result, taken = worker_command("--queues", "train-80g,train")
    assert result.exit_code == 0, result.output
    assert taken == [["train-80g", "train"]]


def test_afina_worker_takes_the_environment_s_queues_without_the_option(worker_command):
    result, taken = worker_command()
    assert result.exit_code == 0, result.output
    assert taken == [["train"]]


def test_afina_worker_refuses_a_bad_queue_name(worker_command):
    result, taken = worker_command("--queues", "train 80g")
    assert result.exit_code == 2
    assert "--queues" in result.output
    assert taken == []


# --- where Celery sends a message --------------------------------------------------------------


def test_a_job_s_message_goes_to_the_queue_its_sender_names(tmp_path):
    from afina.worker.celery_app import create_celery

    app = create_celery(Settings(_env_file=None, data_dir=tmp_path))
    router = app.amqp.router
    assert router.route({"queue": "train-80g"}, TRAIN_TASK)["queue"].name == "train-80g"
    assert router.route({}, TRAIN_TASK)["queue"].name == TRAIN_QUEUE
    assert router.route({}, EXPORT_TASK)["queue"].name == EXPORT_QUEUE


def test_a_multi_gpu_job_goes_to_a_worker_with_as_many_and_counts_global_batches():
    total = needed()
    one_gpu = worker("one", 2 * total, "train")
    four_gpus = worker("four", 4 * total, "train-multi")
    four_gpus.max_ranks = 4
    two_ranks = CONFIG.model_copy(
        update={"resources": CONFIG.resources.model_copy(update={"gpus": 2})}
    )

    planned = plan(SHAPE, two_ranks, DATA, [one_gpu, four_gpus], auto_batch=False)
    assert (planned.queue, planned.fits.workers) == ("train-multi", ["four"])
    # 8 examples, 2 a rank, 2 ranks: 2 steps an epoch, where one rank takes 4.
    alone = plan(SHAPE, CONFIG, DATA, [one_gpu], auto_batch=False)
    assert planned.steps * 2 == alone.steps

    eight = CONFIG.model_copy(update={"resources": CONFIG.resources.model_copy(update={"gpus": 8})})
    refused = plan(SHAPE, eight, DATA, [one_gpu, four_gpus], auto_batch=False)
    assert refused.fits.checked
    assert (refused.fits.workers, refused.queue) == ([], None)
    assert refused.fits.param == "resources.gpus"
    assert "asks for 8 GPUs of one node" in refused.fits.reason
    assert "at most 4" in refused.fits.reason


def test_gpus_is_a_whole_number_of_one_to_sixty_four_and_reaches_the_resolved_config():
    assert ResourceSettings.model_validate({"gpus": 2.0}).gpus == 2
    for bad in (0, 65, 1.5, "2", True):
        with pytest.raises(ValidationError):
            ResourceSettings.model_validate({"gpus": bad})
    request = ConfigRequest.model_validate({"resources": {"gpus": 3}})
    assert resolve_config(request, num_examples=8, model_max_length=512).resources.gpus == 3
