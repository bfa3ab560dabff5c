"""Taking a fine-tuned model away, on the embedded stack with its worker: the adapter (or a
checkpoint's) downloads as a .tar.gz that peft loads, over HTTP and with `afina jobs
download`; a merged export gives the very greedy tokens of the adapter on its base; deleting
the model frees its storage, and it is gone for every route after."""

import io
import tarfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from afina.api.app import create_app
from afina.cli.main import app as cli
from afina.core.storage import adapter_key, checkpoint_key, export_key
from tests.e2e.conftest import wait_for_job
from tests.e2e.test_training import arithmetic, create_job, upload_id
from tests.e2e.test_worker_shutdown import wait_until
from tests.support import LOCAL, assert_error, serve_in_thread

STEPS, SAVE_EVERY = 6, 3


@pytest.fixture(scope="module")
def trained(stack, demo_model) -> dict:
    """A job of a few steps with a checkpoint half way: the job object, once it succeeded."""
    with TestClient(create_app(stack), base_url=LOCAL) as api:
        training = upload_id(api, arithmetic(24, seed=9))
        job = create_job(
            api,
            model=str(demo_model),
            training_file=training,
            suffix="takeaway",
            hyperparameters={"batch_size": 4},
            training={"max_steps": STEPS, "save_steps": SAVE_EVERY, "learning_rate": 1e-2},
        )
        done = wait_for_job(api, stack, job["id"])
        assert done["status"] == "succeeded", done["error"]
        return done


def unpacked(content: bytes, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as archive:
        archive.extractall(into, filter="data")
    (folder,) = list(into.iterdir())
    return folder


def greedy(model, tokenizer, prompt: str) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_adapter_and_a_checkpoint_download_and_load_with_peft(
    api, stack, trained, demo_model, tmp_path
):
    job_id = trained["id"]
    response = api.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert f'filename="{job_id}.tar.gz"' in response.headers["content-disposition"]
    folder = unpacked(response.content, tmp_path / "final")
    assert folder.name == job_id
    names = {path.name for path in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert "tokenizer_config.json" in names
    readme = (folder / "README.md").read_text()
    assert str(demo_model) in readme
    assert trained["fine_tuned_model"] in readme
    assert '"max_steps": 6' in readme  # the resolved config
    base = AutoModelForCausalLM.from_pretrained(demo_model)
    model = PeftModel.from_pretrained(base, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template  # the template the job trained with
    stored = Path(stack.storage_url) / adapter_key(job_id) / "adapter_model.safetensors"
    assert (folder / "adapter_model.safetensors").read_bytes() == stored.read_bytes()
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)

    response = api.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", params={"checkpoint": SAVE_EVERY})
    assert response.status_code == 200, response.text
    checkpoint = unpacked(response.content, tmp_path / "checkpoint")
    assert checkpoint.name == f"{job_id}-ckpt-step-{SAVE_EVERY}"
    assert {"optimizer.pt", "trainer_state.json"}.isdisjoint(p.name for p in checkpoint.iterdir())
    assert (checkpoint / "tokenizer_config.json").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model), checkpoint)
    assert f"{job_id}:ckpt-step-{SAVE_EVERY}" in (checkpoint / "README.md").read_text()

    missing = api.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", params={"checkpoint": 2})
    assert_error(missing, 404, "checkpoint", "checkpoint_not_found")


def test_afina_jobs_download_unpacks_the_adapter(stack, trained, tmp_path):
    with serve_in_thread(create_app(stack)) as url:
        runner = CliRunner()
        target = tmp_path / "mine"
        result = runner.invoke(
            cli, ["jobs", "download", trained["id"], "-o", str(target), "--base-url", url]
        )
        assert result.exit_code == 0, result.output
        assert (target / "adapter_model.safetensors").exists()
        assert (target / "README.md").exists()
        result = runner.invoke(
            cli,
            ["jobs", "download", trained["id"], "--checkpoint", "2", "-o", str(tmp_path / "x")],
            env={"AFINA_BASE_URL": url},
        )
        assert result.exit_code == 1
        assert "404: Job" in result.output
        assert "no checkpoint at step 2" in result.output
        assert not (tmp_path / "x").exists()


def test_a_merged_export_gives_the_adapter_s_greedy_tokens(
    api, stack, trained, demo_model, tmp_path
):
    job_id = trained["id"]
    created = api.post(
        f"/v1/fine_tuning/jobs/{job_id}/exports", json={"format": "merged", "dtype": "float32"}
    )
    assert created.status_code == 200, created.text
    export = created.json()
    assert (export["status"], export["format"], export["dtype"]) == ("queued", "merged", "float32")

    def current() -> dict:
        return api.get(f"/v1/fine_tuning/jobs/{job_id}/exports/{export['id']}").json()

    wait_until(lambda: current()["status"] in ("succeeded", "failed"), 120, "export never ended")
    done = current()
    assert done["status"] == "succeeded", done["error"]
    listed = api.get(f"/v1/fine_tuning/jobs/{job_id}/exports").json()["data"]
    assert [item["id"] for item in listed] == [export["id"]]

    content = api.get(f"/v1/fine_tuning/jobs/{job_id}/exports/{export['id']}/content")
    assert content.status_code == 200, content.text
    assert len(content.content) == done["bytes"]
    folder = unpacked(content.content, tmp_path / "merged")
    assert any(path.suffix == ".safetensors" for path in folder.iterdir())
    assert not (folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template

    adapter_dir = Path(stack.storage_url) / adapter_key(job_id)
    on_base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32), adapter_dir
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert greedy(merged, tokenizer, prompt) == greedy(on_base, tokenizer, prompt)

    refused = api.post(f"/v1/fine_tuning/jobs/{job_id}/exports", json={"format": "gguf"})
    error = assert_error(refused, 400, "format")
    assert "convert_hf_to_gguf.py" in error["message"]


def test_deleting_a_model_frees_its_storage_and_it_is_gone_after(api, stack, demo_model):
    training = upload_id(api, arithmetic(8, seed=10))
    job = create_job(
        api,
        model=str(demo_model),
        training_file=training,
        hyperparameters={"batch_size": 4},
        training={"max_steps": 2, "save_steps": 1},
    )
    done = wait_for_job(api, stack, job["id"])
    assert done["status"] == "succeeded", done["error"]
    name, job_id = done["fine_tuned_model"], job["id"]
    export = api.post(f"/v1/fine_tuning/jobs/{job_id}/exports", json={"format": "merged"}).json()
    wait_until(
        lambda: (
            api.get(f"/v1/fine_tuning/jobs/{job_id}/exports/{export['id']}").json()["status"]
            == "succeeded"
        ),
        120,
        "export never succeeded",
    )
    artifacts = Path(stack.storage_url)
    kept = [adapter_key(job_id), checkpoint_key(job_id, 1), export_key(job_id, export["id"])]
    assert all((artifacts / key).exists() for key in kept)
    generated = api.post(
        "/generate", json={"model": name, "prompt": "1 + 1 =", "max_new_tokens": 2}
    )
    assert generated.status_code == 200, generated.text  # loaded in the serving cache

    deleted = api.delete(f"/v1/models/{name}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": name, "object": "model", "deleted": True}
    assert not any((artifacts / key).exists() for key in kept)
    assert not (artifacts / checkpoint_key(job_id)).exists()

    assert_error(api.delete(f"/v1/models/{name}"), 404, "model", "model_not_found")
    assert_error(api.get(f"/v1/models/{name}"), 404, "model")
    assert name not in [model["id"] for model in api.get("/v1/models").json()["data"]]
    generate = api.post("/generate", json={"model": name, "prompt": "1 + 1 =", "max_new_tokens": 2})
    assert_error(generate, 404, "model")
    checkpoint = f"{job_id}:ckpt-step-1"
    assert_error(api.post("/generate", json={"model": checkpoint, "prompt": "x"}), 404, "model")
    assert_error(api.get(f"/v1/fine_tuning/jobs/{job_id}/adapter"), 404, "id", "model_deleted")
    content = api.get(f"/v1/fine_tuning/jobs/{job_id}/exports/{export['id']}/content")
    assert_error(content, 404, "export_id", "export_content_missing")
    further = api.post("/v1/fine_tuning/jobs", json={"model": name, "training_file": training})
    assert_error(further, 404, "model", "model_not_found")
    record = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (record["status"], record["fine_tuned_model"]) == ("succeeded", name)
    assert record["model_deleted_at"] is not None
    # The next batch unloads the deleted adapter first; the base still serves.
    base = api.post(
        "/generate", json={"model": str(demo_model), "prompt": "1", "max_new_tokens": 1}
    )
    assert base.status_code == 200, base.text
