"""Settings: the embedded defaults, and the forms operators write values in."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from afina.core.settings import Settings


def test_defaults_put_everything_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)

    data = tmp_path / "data"
    assert settings.data_dir == data
    assert settings.database_url == f"sqlite:///{data / 'afina.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{data / 'broker.db'}"
    assert settings.storage_url == str(data / "artifacts")
    assert settings.allowed_models == ["*"]
    assert settings.api_keys == []


def test_environment_values(monkeypatch, tmp_path):
    monkeypatch.setenv("AFINA_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("AFINA_DATABASE_URL", "postgresql://afina:pw@db:5432/afina")
    monkeypatch.setenv("AFINA_API_KEYS", "team-a:k1, k2 ,")
    monkeypatch.setenv("AFINA_ALLOWED_MODELS", "meta-llama/*,/models/*")
    monkeypatch.setenv("AFINA_MAX_UPLOAD_BYTES", "1000")
    settings = Settings(_env_file=None)

    assert settings.data_dir == Path(tmp_path / "d")
    assert settings.database_url == "postgresql+psycopg://afina:pw@db:5432/afina"
    assert settings.api_keys == ["team-a:k1", "k2"]
    assert settings.allowed_models == ["meta-llama/*", "/models/*"]
    assert settings.max_upload_bytes == 1000
    assert settings.storage_url == str(tmp_path / "d" / "artifacts")


def test_explicit_driver_is_kept():
    url = "postgresql+psycopg://u@h/db"
    assert Settings(_env_file=None, database_url=url).database_url == url
    assert Settings(_env_file=None, database_url="postgres://u@h/db").database_url == url


def test_api_keys_map_to_their_project_and_bare_keys_to_default():
    settings = Settings(_env_file=None, api_keys="alpha:k1,k2,beta:k:with:colons")
    assert settings.api_key_projects() == {
        "k1": "alpha",
        "k2": "default",
        "k:with:colons": "beta",
    }


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("a b:s3cret", "entry 2: the project"),
        (f"{'p' * 65}:s3cret", "entry 2: the project"),
        ("Xy9+s3cret/abc:rest", "entry 2: the project"),  # a bare key with a ':' in it
        ("team:", "entry 2: the key"),
        (":s3cret", "entry 2: the project"),
        ("team: s3cret", "entry 2: the key"),  # the space would never match
        ("team:cl\u00e9s3cret", "entry 2: the key"),  # a header carries no such character
        ("other:other-s3cret", "entry 2 repeats the key of entry 1"),  # whose project?
    ],
)
def test_api_keys_that_no_request_could_use_are_refused(entry, problem):
    with pytest.raises(ValidationError, match="api_keys") as refused:
        Settings(_env_file=None, api_keys=["ok:other-s3cret", entry])
    assert problem in str(refused.value)
    assert "s3cret" not in str(refused.value)  # the error never shows a key, or part of one
