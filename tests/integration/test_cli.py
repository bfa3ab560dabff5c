"""The `afina` command as a user runs it: a real process, a real socket."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.support import AFINA, afina_serve, child_pids


def test_help_lists_the_commands():
    result = subprocess.run([AFINA, "--help"], capture_output=True, text=True, check=True)
    assert "serve" in result.stdout
    for command in ("migrate", "worker", "demo-model"):
        assert command in result.stdout


def test_api_import_does_not_load_torch():
    code = "import sys, afina.api.app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_serve_migrates_and_answers_on_the_embedded_default(tmp_path):
    with afina_serve(tmp_path, "--no-worker") as (base, server):
        assert child_pids(server.pid) == []
        line = json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n"
        response = httpx.post(
            f"{base}/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", line.encode())},
        )
        assert response.status_code == 200, response.text
        assert httpx.get(f"{base}/readyz").status_code == 200
    data_dir = tmp_path / "data"
    assert (data_dir / "afina.db").is_file()
    assert (data_dir / "artifacts" / "files" / f"{response.json()['id']}.jsonl").is_file()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.org"])
def test_serve_refuses_an_open_api_beyond_loopback(tmp_path, host):
    env = {**os.environ, "AFINA_DATA_DIR": str(tmp_path / "data"), "AFINA_API_KEYS": ""}
    result = subprocess.run(
        [AFINA, "serve", "--host", host, "--no-worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "AFINA_API_KEYS" in result.stderr
    assert not (tmp_path / "data" / "afina.db").exists()  # refused before touching anything


def test_serve_beyond_loopback_with_a_stored_key_needs_it(tmp_path):
    env = {**os.environ, "AFINA_DATA_DIR": str(tmp_path / "data"), "AFINA_API_KEYS": ""}
    env.pop("AFINA_DATABASE_URL", None)
    created = subprocess.run(
        [AFINA, "keys", "create", "--project", "alpha"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = created.stdout.strip()
    with afina_serve(tmp_path, "--host", "0.0.0.0", "--no-worker") as (base, _server):
        assert httpx.get(f"{base}/v1/files").status_code == 401
        answer = httpx.get(f"{base}/v1/files", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
    assert "callers need an API key" in (tmp_path / "serve.log").read_text()
