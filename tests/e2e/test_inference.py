"""Serving for real: two adapters trained by the worker on the tiny demo model, called
through `/v1/chat/completions`, `/v1/completions` (the official openai client) and
`/generate`, streamed and not, alone and batched together."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from afina.api.app import create_app
from afina.core.settings import Settings
from afina.core.storage import adapter_key
from afina.serving import batch
from tests.e2e.conftest import wait_for_job
from tests.support import LOCAL, assert_error, jsonl, serve_in_thread, upload

QUESTIONS = [
    "Is the sky blue?",
    "Do you like tea?",
    "Is Paris in France?",
    "Can a fox jump?",
    "Is one less than two?",
    "Will it rain today?",
    "Is this a test?",
    "Are you a model?",
]
GREEDY = {"temperature": 0, "max_tokens": 8}


def _dataset(answer: str) -> bytes:
    return jsonl(
        *(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            for q in QUESTIONS * 4
        )
    )


@pytest.fixture(scope="module")
def trained(stack: Settings, demo_model: Path) -> dict[str, dict]:
    """Two succeeded jobs on the demo model: `yes` answers every question yes, `no` no."""
    jobs = {}
    with TestClient(create_app(stack), base_url=LOCAL) as api:
        for answer in ("yes", "no"):
            file_id = upload(api, _dataset(answer)).json()["id"]
            response = api.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": str(demo_model),
                    "training_file": file_id,
                    "suffix": answer,
                    "seed": 1,
                    "method": {
                        "type": "supervised",
                        "supervised": {"hyperparameters": {"n_epochs": 6, "batch_size": 8}},
                    },
                    "training": {"learning_rate": 1e-2, "save_steps": 12},
                },
            )
            assert response.status_code == 200, response.text
            jobs[answer] = response.json()
        for answer, job in jobs.items():
            jobs[answer] = wait_for_job(api, stack, job["id"])
            assert jobs[answer]["status"] == "succeeded", jobs[answer]["error"]
    return jobs


@contextmanager
def serving(stack: Settings, **overrides: Any) -> Iterator[tuple[str, FastAPI]]:
    app = create_app(stack.model_copy(update=overrides))
    with serve_in_thread(app) as url:
        yield url, app


@dataclass
class Batches:
    """The batches an engine served (their sizes), and its model cache."""

    sizes: list[int] = field(default_factory=list)
    running: int = 0
    models: Any = None

    @property
    def done(self) -> int:
        return len(self.sizes) - self.running

    @property
    def loaded_adapters(self) -> tuple[str, ...]:
        return self.models.loaded_adapters


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Batches:
    """What the batches of the engines started in this test were (an engine takes
    `serve_batch` when its thread starts, at its first request)."""
    seen = Batches()
    serve_batch = batch.serve_batch

    def recording(models: Any, streams: list[Any], max_new_tokens: int) -> None:
        seen.sizes.append(len(streams))
        seen.models = models
        seen.running += 1
        try:
            serve_batch(models, streams, max_new_tokens)
        finally:
            seen.running -= 1

    monkeypatch.setattr(batch, "serve_batch", recording)
    return seen


@pytest.fixture(scope="module")
def server(stack: Settings, trained) -> Iterator[tuple[str, FastAPI]]:
    with serving(stack) as served:
        yield served


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def sse(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_each_adapter_answers_as_it_was_trained_through_the_openai_client(
    client, trained, demo_model
):
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    prompt = tokenizer.apply_chat_template(ask("Is the sea wet?"), add_generation_prompt=True)
    for answer, job in trained.items():
        reply = client.chat.completions.create(
            model=job["fine_tuned_model"], messages=ask("Is the sea wet?"), **GREEDY
        )
        assert reply.model == job["fine_tuned_model"]
        assert reply.choices[0].message.content == answer
        assert reply.choices[0].finish_reason == "stop"  # at <|im_end|>, not at max_tokens
        assert reply.usage.prompt_tokens == len(prompt["input_ids"])
        answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        assert reply.usage.completion_tokens == answer_tokens + 1  # and <|im_end|>


def test_streamed_chat_gives_the_same_text_token_by_token(client, trained):
    model = trained["yes"]["fine_tuned_model"]
    whole = client.chat.completions.create(
        model=model, messages=ask("What is this?"), temperature=0, max_tokens=12
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=ask("What is this?"),
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert not any(finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage


def test_completions_stream_and_whole_agree_and_stop_at_max_tokens(client, trained):
    model = trained["no"]["fine_tuned_model"]
    whole = client.completions.create(
        model=model, prompt="The quick brown fox", temperature=0, max_tokens=5
    )
    assert whole.choices[0].finish_reason in ("stop", "length")
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 5
    streamed = client.completions.create(
        model=model, prompt="The quick brown fox", temperature=0, max_tokens=5, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_generate_takes_a_model_or_a_job_id_and_streams(server, trained):
    url, _ = server
    job = trained["yes"]
    by_name = httpx.post(
        f"{url}/generate",
        json={"model": job["fine_tuned_model"], "messages": ask("Is it cold?"), "temperature": 0},
    )
    assert by_name.status_code == 200, by_name.text
    body = by_name.json()
    assert body["model"] == job["fine_tuned_model"]
    assert body["text"] == "yes"
    assert body["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] >= 2  # the answer and <|im_end|>

    with httpx.stream(
        "POST",
        f"{url}/generate",
        json={
            "job_id": job["id"],
            "messages": ask("Is it cold?"),
            "temperature": 0,
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[-1] == "[DONE]"
    *deltas, last = events[:-1]
    assert "".join(e["text"] for e in deltas) == "yes"
    assert last["finish_reason"] == "stop"
    assert last["usage"] == body["usage"]


def test_stop_strings_end_the_text_before_them(client, trained):
    reply = client.completions.create(
        model=trained["yes"]["fine_tuned_model"],
        prompt="One, two, three,",
        temperature=0,
        max_tokens=30,
    )
    text = reply.choices[0].text
    assert len(text) > 2
    stop = text[1:3]
    cut = client.completions.create(
        model=trained["yes"]["fine_tuned_model"],
        prompt="One, two, three,",
        temperature=0,
        max_tokens=30,
        stop=[stop],
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer(client, trained):
    model = trained["no"]["fine_tuned_model"]
    answers = {
        client.completions.create(
            model=model, prompt="Hello", temperature=1.5, max_tokens=20, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(answers) == 1


def test_models_list_shows_the_base_and_the_fine_tuned_models(client, trained, demo_model):
    listed = {model.id: model for model in client.models.list()}
    for job in trained.values():
        assert listed[job["fine_tuned_model"]].owned_by == "default"
    assert listed[str(demo_model)].owned_by == "system"
    assert (
        client.models.retrieve(trained["yes"]["fine_tuned_model"]).id
        == (trained["yes"]["fine_tuned_model"])
    )


def test_a_base_model_and_a_checkpoint_are_called_by_name(client, trained, demo_model):
    base = client.chat.completions.create(
        model=str(demo_model), messages=ask("Is the sea wet?"), **GREEDY
    )
    assert base.choices[0].message.content != "yes"  # no adapter: random weights
    job_id = trained["yes"]["id"]
    checkpoint = client.chat.completions.create(
        model=f"{job_id}:ckpt-step-12", messages=ask("Is the sea wet?"), **GREEDY
    )
    assert checkpoint.model == f"{job_id}:ckpt-step-12"


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(stack, trained, batches):
    requests = [
        ("yes", {"messages": ask("Is the sea wet?")}),
        ("no", {"messages": ask("Is the sea wet?")}),
        ("yes", {"prompt": "The quick brown fox"}),
        ("no", {"prompt": "One, two, three,"}),
    ]

    def call(url: str, answer: str, body: dict) -> dict:
        model = trained[answer]["fine_tuned_model"]
        response = httpx.post(
            f"{url}/generate",
            json={"model": model, "temperature": 0, "max_new_tokens": 12, **body},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()

    with serving(stack, max_batch_size=1) as (url, _):
        alone = [call(url, answer, body) for answer, body in requests]
    assert max(batches.sizes) == 1
    batches.sizes.clear()
    with serving(stack, batch_window_ms=2000) as (url, _):
        together: list[dict] = [{}] * len(requests)

        def run(index: int) -> None:
            together[index] = call(url, *requests[index])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert max(batches.sizes) == len(requests)
    assert together == alone
    assert [alone[0]["text"], alone[1]["text"]] == ["yes", "no"]


def test_the_adapter_cache_keeps_at_most_its_bound(stack, trained, batches):
    with serving(stack, max_loaded_adapters=1) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answers = []
        for answer in ("yes", "no", "yes"):
            job = trained[answer]
            reply = client.chat.completions.create(
                model=job["fine_tuned_model"], messages=ask("Is the sea wet?"), **GREEDY
            )
            answers.append(reply.choices[0].message.content)
            assert batches.loaded_adapters == (adapter_key(job["id"]),)
    assert answers == ["yes", "no", "yes"]


def test_health_answers_while_a_generation_runs(stack, trained, demo_model, batches):
    body = {
        "model": str(demo_model),
        "prompt": "Tell me a long story.",
        "temperature": 1,
        "seed": 3,
        "max_new_tokens": 480,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        serving(stack) as (url, _),
        httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as response,
    ):
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the first token is out: the batch runs
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/v1/fine_tuning/jobs").status_code == 200
        running = batches.done == 0
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert running, "health and job polling waited for the generation to end"
    assert events[-1]["usage"]["completion_tokens"] == 480


def test_errors_name_the_field_and_never_reach_500(client, server, trained, stack):
    url, _ = server
    model = trained["yes"]["fine_tuned_model"]
    response = httpx.post(
        f"{url}/v1/completions", json={"model": model, "prompt": "x " * 600, "max_tokens": 4}
    )
    assert_error(response, 400, "prompt", "context_length_exceeded")
    response = httpx.post(
        f"{url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 600}
    )
    assert_error(response, 400, "max_tokens", "context_length_exceeded")
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="ft:nope", messages=ask("hi"))
    assert raised.value.body["code"] == "model_not_found"

    adapter = stack.data_dir / "artifacts" / adapter_key(trained["no"]["id"])
    hidden = adapter.with_name("hidden")
    adapter.rename(hidden)
    try:
        response = httpx.post(
            f"{url}/generate", json={"job_id": trained["no"]["id"], "prompt": "hi"}
        )
        assert_error(response, 404, "job_id", "adapter_not_found")
    finally:
        hidden.rename(adapter)


def test_completions_default_to_16_tokens_within_the_servers_ceiling(stack, trained):
    model = trained["yes"]["fine_tuned_model"]
    body = {"model": model, "prompt": "Hello", "ignore_eos": True}
    with serving(stack) as (url, _):
        usage = httpx.post(f"{url}/v1/completions", json=body).json()["usage"]
        assert usage["completion_tokens"] == 16  # OpenAI's default, not the whole context
    with serving(stack, max_new_tokens=8) as (url, _):
        usage = httpx.post(f"{url}/v1/completions", json=body).json()["usage"]
        assert usage["completion_tokens"] == 8


def test_a_tiny_temperature_samples_the_best_token_and_spoils_no_neighbour(stack, trained, batches):
    body = {
        "model": trained["no"]["fine_tuned_model"],
        "prompt": "One, two, three,",
        "max_new_tokens": 12,
    }
    answers: dict[float, httpx.Response] = {}

    def call(temperature: float) -> None:
        url_body = {**body, "temperature": temperature}
        answers[temperature] = httpx.post(f"{url}/generate", json=url_body, timeout=60)

    with serving(stack, batch_window_ms=2000) as (url, _):
        # 1e-40 is subnormal in float32; 1e-46 underflows to 0 there; 5e-324 is the smallest
        # double.
        temperatures = (0, 1e-40, 1e-46, 5e-324)
        threads = [threading.Thread(target=call, args=(t,)) for t in temperatures]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert max(batches.sizes) == len(temperatures)
    assert [answers[t].status_code for t in temperatures] == [200] * len(temperatures)
    assert {answers[t].json()["text"] for t in temperatures} == {answers[0].json()["text"]}


def test_a_prompt_far_over_the_context_is_refused_before_tokenizing(server, trained):
    url, _ = server
    body = {"model": trained["yes"]["fine_tuned_model"], "messages": ask("x" * 40_000)}
    # The server's first request waits for its model to load: longer than httpx's 5 s on a
    # busy machine.
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    error = assert_error(response, 400, "messages", "context_length_exceeded")
    assert "40000 characters" in error["message"]  # counted, not tokenized
