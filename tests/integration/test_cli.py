"""The `afina` command as a user runs it: a real process, a real socket."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

AFINA = Path(sys.executable).with_name("afina")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_help_lists_the_commands():
    result = subprocess.run([AFINA, "--help"], capture_output=True, text=True, check=True)
    assert "serve" in result.stdout
    assert "migrate" in result.stdout


def test_api_import_does_not_load_torch():
    code = "import sys, afina.api.app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_serve_migrates_and_answers_on_the_embedded_default(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "AFINA_DATA_DIR": str(data_dir)}
    for name in ("AFINA_DATABASE_URL", "AFINA_STORAGE_URL", "AFINA_API_KEYS"):
        env.pop(name, None)
    server = subprocess.Popen(
        [AFINA, "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "afina serve did not come up in 60 s"
            time.sleep(0.2)

        line = json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n"
        response = httpx.post(
            f"{base}/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", line.encode())},
        )
        assert response.status_code == 200, response.text
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (data_dir / "afina.db").is_file()
    assert (data_dir / "artifacts" / "files" / f"{response.json()['id']}.jsonl").is_file()
