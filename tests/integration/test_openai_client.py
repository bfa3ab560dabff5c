"""The official `openai` client against a live afina server, on both backends."""

import json

import openai
import pytest

from afina.models import JobStatus
from tests.support import add_rows, job_row

pytestmark = pytest.mark.both_backends

LINES = [
    {"messages": [{"role": "user", "content": f"Say {n}"}, {"role": "assistant", "content": n}]}
    for n in ("one", "two", "three")
]
CONTENT = "".join(json.dumps(line) + "\n" for line in LINES).encode()


@pytest.fixture
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


def test_files_round_trip(client, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(CONTENT)

    with path.open("rb") as handle:
        created = client.files.create(file=handle, purpose="fine-tune")
    assert created.id.startswith("file-")
    assert created.bytes == len(CONTENT)
    assert created.filename == "train.jsonl"
    assert created.status == "processed"
    validation = created.model_extra["validation"]
    assert (validation["format"], validation["num_examples"]) == ("chat", 3)

    assert client.files.retrieve(created.id).id == created.id
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.content(created.id).content == CONTENT

    second = client.files.create(file=("more.jsonl", CONTENT), purpose="fine-tune")
    page = client.files.list(limit=1)
    assert [f.id for f in page.data] == [second.id]
    assert page.has_more is True
    assert [f.id for f in client.files.list(limit=1)] == [second.id, created.id]  # auto-paging

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError) as missing:
        client.files.retrieve(created.id)
    assert missing.value.code == "not_found"


def test_bad_file_raises_bad_request_naming_the_line(client):
    bad = CONTENT + b'{"messages": [{"role": "wizard", "content": "hi"}]}\n'
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    error = refused.value
    assert error.status_code == 400
    assert error.param == "file"
    assert error.code == "invalid_file_format"
    assert "line 4: messages[0].role: unknown role 'wizard'" in error.message
    assert client.files.list().data == []


def test_wrong_purpose_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("a.jsonl", CONTENT), purpose="assistants")
    assert refused.value.param == "purpose"


PAIRS = "".join(
    json.dumps(
        {
            "input": {"messages": [{"role": "user", "content": f"Say {n}"}]},
            "preferred_output": [{"role": "assistant", "content": n}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }
    )
    + "\n"
    for n in ("one", "two", "three")
).encode()


def test_a_dpo_job_is_created_with_the_official_client(client):
    pairs = client.files.create(file=("pairs.jsonl", PAIRS), purpose="fine-tune")
    assert pairs.model_extra["validation"]["format"] == "preference"
    job = client.fine_tuning.jobs.create(
        model="org/base",
        training_file=pairs.id,
        validation_file=pairs.id,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 2}},
        },
        extra_body={"evaluation": {"samples": 3}},
    )
    assert job.method.type == "dpo"
    assert job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == 2
    assert job.model_extra["config"]["evaluation"]["samples"] == 3
    assert job.result_files == []
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model="org/base", training_file=pairs.id, method={"type": "supervised"}
        )
    assert (refused.value.param, refused.value.code) == ("training_file", "invalid_file_format")


def test_pause_resume_and_model_delete_with_the_official_client(client, settings):
    training = client.files.create(file=("train.jsonl", CONTENT), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="org/base", training_file=training.id)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert (paused.id, paused.status) == (job.id, "paused")
    with pytest.raises(openai.ConflictError) as refused:
        client.fine_tuning.jobs.pause(job.id)
    assert refused.value.code == "job_not_pausable"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    with pytest.raises(openai.ConflictError) as refused:
        client.fine_tuning.jobs.resume(job.id)
    assert refused.value.code == "job_not_paused"

    done = job_row(project="default", status=JobStatus.SUCCEEDED, model="org/base")
    done.fine_tuned_model = done.fine_tuned_model_name()
    add_rows(settings, done)
    deleted = client.models.delete(done.fine_tuned_model)
    assert (deleted.id, deleted.deleted) == (done.fine_tuned_model, True)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(done.fine_tuned_model)
