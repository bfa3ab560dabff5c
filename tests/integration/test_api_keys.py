"""Keys kept in the database: `afina keys create|list|revoke` as a user runs it (a real
process on the real database), and the API honouring them at the next request, with no
restart. Storing, revoking and honouring keys run on both backends."""

import hashlib
import os
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from afina.api.app import create_app
from afina.api.keys import KEY_PREFIX, revoke_keys
from afina.models import ApiKey, File
from tests.support import AFINA, LOCAL, assert_error, jsonl, rows, upload

EXAMPLE = jsonl({"prompt": "2+2=", "completion": "4"})


@pytest.fixture
def afina_keys(settings):
    """`afina keys ARGS...` on the test's database; returns the finished process."""

    def run(*args: str, api_keys: str = "") -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "AFINA_DATA_DIR": str(settings.data_dir),
            "AFINA_DATABASE_URL": settings.database_url,
            "AFINA_API_KEYS": api_keys,
        }
        return subprocess.run(
            [AFINA, "keys", *args], env=env, capture_output=True, text=True, timeout=60
        )

    return run


def create(afina_keys, project: str) -> str:
    result = afina_keys("create", "--project", project)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.both_backends
def test_a_created_key_is_shown_once_stored_hashed_and_opens_its_project(
    afina_keys, settings, client
):
    result = afina_keys("create", "--project", "alpha", "--name", "ci runner")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert result.stdout == key + "\n"  # alone on stdout, for `KEY=$(afina keys create ...)`
    assert key.startswith(KEY_PREFIX)
    assert len(key) > len(KEY_PREFIX) + 40
    assert "shown only this once" in result.stderr

    (row,) = rows(settings, ApiKey)
    assert (row.project, row.name, row.revoked_at) == ("alpha", "ci runner", None)
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.id in result.stderr
    stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
    assert not any(key in value for value in stored)

    assert client.get("/v1/files").status_code == 401
    created = upload(client, EXAMPLE, headers=bearer(key))
    assert created.status_code == 200, created.text
    (file,) = rows(settings, File)
    assert file.project == "alpha"

    beta = create(afina_keys, "beta")
    assert client.get(f"/v1/files/{file.id}", headers=bearer(beta)).status_code == 404
    assert client.get("/v1/files", headers=bearer(beta)).json()["data"] == []
    assert client.get(f"/v1/files/{file.id}", headers=bearer(key)).status_code == 200


def test_an_open_service_needs_a_key_from_the_first_key_stored(afina_keys, client):
    assert client.get("/v1/files").status_code == 200  # no key set or stored: open
    key = create(afina_keys, "alpha")
    response = client.get("/v1/files")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    assert client.get("/v1/files", headers=bearer(key)).status_code == 200


@pytest.mark.both_backends
def test_a_revoked_key_stops_at_its_next_request_and_the_service_stays_closed(
    afina_keys, make_settings
):
    settings = make_settings(key_cache_seconds=0)
    key = create(afina_keys, "alpha")
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        assert client.get("/v1/files", headers=bearer(key)).status_code == 200
        (row,) = rows(settings, ApiKey)

        result = afina_keys("revoke", row.id)
        assert result.returncode == 0, result.stderr
        assert f"Revoked {row.id} (project alpha)" in result.stdout

        response = client.get("/v1/files", headers=bearer(key))
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        # Revoking the last key does not open the service to callers without one.
        assert client.get("/v1/files").status_code == 401
    (row,) = rows(settings, ApiKey)
    assert row.revoked_at is not None


def test_a_key_found_valid_is_remembered_for_key_cache_seconds_and_no_longer(
    afina_keys, make_settings
):
    settings = make_settings(key_cache_seconds=1.0)
    key = create(afina_keys, "alpha")
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        assert client.get("/v1/files", headers=bearer(key)).status_code == 200
        revoke_keys(client.app.state.session_factory, key, None)
        revoked = time.monotonic()
        # Remembered: the next request does not ask the database.
        assert client.get("/v1/files", headers=bearer(key)).status_code == 200
        while client.get("/v1/files", headers=bearer(key)).status_code == 200:
            assert time.monotonic() - revoked < 3, "the revoked key still works after 3 s"
            time.sleep(0.05)
        assert client.get("/v1/files", headers=bearer(key)).status_code == 401


@pytest.mark.both_backends
def test_revoke_by_project_or_by_the_key_itself(afina_keys, make_settings):
    settings = make_settings(key_cache_seconds=0)  # a revoked key stops at its next request
    alpha_1, alpha_2, beta = (create(afina_keys, p) for p in ("alpha", "alpha", "beta"))

    with TestClient(create_app(settings), base_url=LOCAL) as client:
        result = afina_keys("revoke", "--project", "alpha")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("(project alpha)") == 2
        for key in (alpha_1, alpha_2):
            assert client.get("/v1/files", headers=bearer(key)).status_code == 401
        assert client.get("/v1/files", headers=bearer(beta)).status_code == 200

        # A key and a project that do not match revoke nothing.
        assert afina_keys("revoke", beta, "--project", "alpha").returncode == 1
        assert client.get("/v1/files", headers=bearer(beta)).status_code == 200

        assert afina_keys("revoke", beta).returncode == 0
        assert client.get("/v1/files", headers=bearer(beta)).status_code == 401
    assert all(row.revoked_at is not None for row in rows(settings, ApiKey))


def test_revoke_says_when_nothing_matches(afina_keys):
    result = afina_keys("revoke", "key-does-not-exist")
    assert result.returncode == 1
    assert "no stored key matches" in result.stderr
    result = afina_keys("revoke")
    assert result.returncode == 2
    assert "--project" in result.stderr


def test_list_shows_ids_and_prefixes_never_the_keys(afina_keys, settings):
    alpha, beta = create(afina_keys, "alpha"), create(afina_keys, "beta")
    revoked = create(afina_keys, "gamma")
    assert afina_keys("revoke", revoked).returncode == 0
    by_project = {row.project: row for row in rows(settings, ApiKey)}

    listed = afina_keys("list", api_keys="ops:bootstrap-secret")
    assert listed.returncode == 0, listed.stderr
    for project in ("alpha", "beta"):
        assert by_project[project].id in listed.stdout
        assert f"{by_project[project].prefix}..." in listed.stdout
    assert by_project["gamma"].id not in listed.stdout
    for key in (alpha, beta, revoked, "bootstrap-secret"):
        assert key not in listed.stdout
    assert "AFINA_API_KEYS also holds keys for project(s): ops" in listed.stdout

    only_beta = afina_keys("list", "--project", "beta", "--revoked").stdout
    assert by_project["beta"].id in only_beta
    assert by_project["alpha"].id not in only_beta
    with_revoked = afina_keys("list", "--revoked").stdout
    assert by_project["gamma"].id in with_revoked


@pytest.mark.parametrize("project", ["has space", "a/b", "", "x" * 65])
def test_create_refuses_a_bad_project_name(afina_keys, settings, project):
    result = afina_keys("create", "--project", project)
    assert result.returncode == 2
    assert "--project" in result.stderr
    assert rows(settings, ApiKey) == []


def test_bootstrap_and_stored_keys_work_side_by_side(afina_keys, make_settings):
    settings = make_settings(api_keys=["ops:bootstrap-secret", "bare-secret"])
    stored = create(afina_keys, "alpha")
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        for key, project in (
            ("bootstrap-secret", "ops"),
            ("bare-secret", "default"),
            (stored, "alpha"),
        ):
            response = upload(client, EXAMPLE, headers=bearer(key))
            assert response.status_code == 200, response.text
            owners = {file.id: file.project for file in rows(settings, File)}
            assert owners[response.json()["id"]] == project
            for file in rows(settings, File):
                visible = client.get(f"/v1/files/{file.id}", headers=bearer(key)).status_code
                assert visible == (200 if file.project == project else 404)


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "attacker.example"},  # DNS rebinding: a page's own name, pointing here
        {"Host": "localhost.attacker.example:8000"},
        {"Origin": "http://attacker.example"},  # a form another site's page posts
        {"Origin": "null"},  # a sandboxed page or a local file
    ],
)
def test_an_open_service_answers_only_its_own_machine(client, settings, headers):
    listed = client.get("/v1/files", headers=headers)
    error = assert_error(listed, 403, None, "not_local")
    assert "afina keys create" in error["message"]
    posted = upload(client, EXAMPLE, headers=headers)
    assert posted.status_code == 403
    for dashboard in ("/", "/jobs/ftjob-x", "/static/dashboard.js"):  # the dashboard too
        assert_error(client.get(dashboard, headers=headers), 403, None, "not_local")
    assert rows(settings, File) == []
    assert not list((settings.data_dir / "artifacts").rglob("*.jsonl"))


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "127.0.0.1:8000"},
        {"Host": "[::1]:8000"},
        {"Host": "localhost:8000", "Origin": "http://localhost:3000"},
        {"Host": "127.0.0.2", "Origin": "http://127.0.0.1:8000"},
    ],
)
def test_an_open_service_answers_loopback_names(client, headers):
    assert client.get("/v1/files", headers=headers).status_code == 200
    assert client.get("/", headers=headers).status_code == 200


def test_the_dashboard_pages_need_no_key_but_its_api_calls_do(make_settings):
    app = create_app(make_settings(api_keys=["team:team-key"]))
    with TestClient(app, base_url=LOCAL) as client:
        page = client.get("/jobs/ftjob-anything")
        assert page.status_code == 200
        assert 'data-job="ftjob-anything"' in page.text
        assert client.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200
        assert_error(client.get("/v1/fine_tuning/jobs"), 401, None, "missing_api_key")
        escaped = client.get('/jobs/"><img src=x onerror=alert(1)>')
        assert escaped.status_code == 200
        assert "<img src=x" not in escaped.text  # the template escapes the id
        assert "&lt;img src=x" in escaped.text


def test_with_a_key_any_host_and_origin_may_call(afina_keys, client):
    key = create(afina_keys, "alpha")
    foreign = {"Host": "afina.example.com", "Origin": "https://app.example.com"}
    assert client.get("/v1/files", headers={**foreign, **bearer(key)}).status_code == 200
    assert client.get("/v1/files", headers=foreign).status_code == 401


def test_the_health_probes_need_no_key_behind_a_proxy_prefix(make_settings):
    app = create_app(make_settings(api_keys=["alpha:key-a"]))
    with TestClient(app, base_url=LOCAL, root_path="/afina") as client:
        assert client.get("/afina/healthz").status_code == 200
        assert client.get("/afina/v1/files").status_code == 401
