"""The compose file's reverse proxy (deploy/nginx.conf), run for real with Debian's nginx in
front of a live afina: the configuration is valid, requests and uploads pass through, the
errors the proxy answers itself carry afina's JSON error body, and it cuts a client slow with
its headers."""

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import LOCAL, free_port, jsonl

CONFIG = Path(__file__).parents[2] / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
EXAMPLE = jsonl({"prompt": "2+2=", "completion": "4"})

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists(), reason="nginx is not installed (.ci/run installs nginx-light)"
)


def local_config(tmp_path: Path, api: str, port: int, **directives: str) -> Path:
    """deploy/nginx.conf pointed at `api`, listening on `port`, its files under `tmp_path`;
    `directives` replace the values of those the file sets (`client_header_timeout="1s"`)."""
    text = CONFIG.read_text()
    text = text.replace("server api:8000;", f"server {api};")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
    text = text.replace("client_max_body_size 513m;", "client_max_body_size 1m;")
    for name, value in directives.items():
        text, count = re.subn(rf"\b{name} [^;]+;", f"{name} {value};", text)
        assert count == 1, name
    paths = "".join(
        f"    {kind}_temp_path {tmp_path / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + paths, 1)
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    return config


@pytest.fixture
def proxy(live_server: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = local_config(
        tmp_path, live_server.removeprefix("http://"), port, client_header_timeout="1s"
    )
    command = [NGINX, "-p", str(tmp_path), "-c", str(config)]
    settings = ["-g", f"daemon off; user root; pid {tmp_path / 'nginx.pid'};"]
    checked = subprocess.run([*command, *settings, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    server = subprocess.Popen([*command, *settings], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def test_requests_and_uploads_pass_through(proxy):
    # The open service answers only requests for localhost: the proxy passes Host on.
    headers = {"Host": LOCAL.removeprefix("http://")}
    uploaded = httpx.post(
        f"{proxy}/v1/files",
        headers=headers,
        data={"purpose": "fine-tune"},
        files={"file": ("train.jsonl", EXAMPLE)},
    )
    assert uploaded.status_code == 200, uploaded.text
    listed = httpx.get(f"{proxy}/v1/files", headers=headers).json()
    assert [item["id"] for item in listed["data"]] == [uploaded.json()["id"]]


def test_the_proxys_own_errors_have_afinas_error_body(proxy):
    response = httpx.post(
        f"{proxy}/v1/files",
        headers={"Host": "localhost"},
        content=b"x" * (2 * 1024 * 1024),
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_client_slow_with_its_headers_is_cut_off(proxy):
    port = int(proxy.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(b"GET /v1/files HTTP/1.1\r\nHost: local")
    connection.settimeout(10)
    started = time.monotonic()
    while connection.recv(65536):
        pass
    assert time.monotonic() - started < 9  # the proxy's 1 s, not the test's 10 s


def test_the_metrics_stay_off_the_published_port(proxy, live_server):
    response = httpx.get(f"{proxy}/metrics", headers={"Host": "localhost"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{live_server}/metrics").status_code == 200  # Prometheus's way
