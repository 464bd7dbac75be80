"""Settings: defaults, overrides, clear errors, and secrets never shown."""

from pathlib import Path

import pytest

from llmcf.cli import main
from llmcf.settings import SETTINGS, Settings, SettingsError
from llmcf.topics import Topics


def test_defaults_are_the_embedded_ones(tmp_path):
    settings = Settings.from_env({"LLMCF_HOME": str(tmp_path)})
    assert settings.home == tmp_path.resolve()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'llmcf.db'}"
    assert settings.kafka_bootstrap_servers is None and settings.qdrant_url is None
    assert settings.topic_partitions == 4


def test_empty_variables_mean_unset(tmp_path):
    settings = Settings.from_env({"LLMCF_HOME": str(tmp_path), "KAFKA_BOOTSTRAP_SERVERS": "", "LLMCF_TOPIC_PARTITIONS": ""})
    assert settings.kafka_bootstrap_servers is None
    assert settings.topic_partitions == 4


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LLMCF_TOPIC_PARTITIONS": "four"}, "LLMCF_TOPIC_PARTITIONS='four' is not an integer"),
        ({"LLMCF_TOPIC_PARTITIONS": "0"}, "LLMCF_TOPIC_PARTITIONS=0 must be at least 1"),
        ({"LLMCF_BROKER_PORT": "-3"}, "LLMCF_BROKER_PORT=-3 must be at least 1"),
        ({"LLMCF_LOG_LEVEL": "LOUD"}, "LLMCF_LOG_LEVEL='LOUD' is not a log level"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_describe_masks_secrets():
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql+psycopg://app:hunter2@db:5432/llmcf",
            "KAFKA_SASL_PASSWORD": "kafka-secret",
            "QDRANT_API_KEY": "qdrant-secret",
        }
    )
    shown = " ".join(value for _, value in settings.describe())
    for secret in ("hunter2", "kafka-secret", "qdrant-secret"):
        assert secret not in shown
    assert "postgresql+psycopg://app:***@db:5432/llmcf" in shown


def test_every_catalogued_variable_is_read():
    source = Path(Settings.from_env.__code__.co_filename).read_text()
    for setting in SETTINGS:
        assert f'"{setting.env}"' in source.split("def from_env", 1)[1], setting.env


def test_topic_names_take_the_prefix():
    settings = Settings.from_env({"LLMCF_TOPIC_PREFIX": "prod.", "LLMCF_TOPIC_PARTITIONS": "8"})
    topics = Topics.from_settings(settings)
    specs = {s.name: s.partitions for s in topics.specs(settings)}
    assert specs == {"prod.items": 8, "prod.interactions": 8, "prod.cot-requests": 8, "prod.cot-results": 8,
                     "prod.dead-letters": 1}


def test_cli_reports_a_bad_setting_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("LLMCF_TOPIC_PARTITIONS", "many")
    with pytest.raises(SystemExit) as exited:
        main(["config"])
    assert exited.value.code == 2
    assert "configuration error: LLMCF_TOPIC_PARTITIONS='many' is not an integer" in capsys.readouterr().err


def test_cli_config_masks_the_database_password(monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app:hunter2@db/llmcf")
    assert main(["config", "--catalogue"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "DATABASE_URL" in out


def test_docs_document_every_setting():
    page = (Path(__file__).parents[2] / "docs" / "settings.md").read_text()
    missing = [s.env for s in SETTINGS if f"`{s.env}`" not in page]
    assert not missing, f"docs/settings.md lacks {missing}"


def test_urls_lose_their_credentials_when_shown():
    from llmcf.settings import without_credentials

    assert without_credentials("http://vllm:8000/v1") == "http://vllm:8000/v1"
    assert without_credentials("http://user:s3cret@vllm:8000/v1") == "http://***@vllm:8000/v1"
    settings = Settings.from_env({"LLMCF_OPENAI_BASE_URL": "https://key:s3cret@api.example/v1",
                                  "QDRANT_URL": "http://admin:s3cret@qdrant:6333"})
    assert "s3cret" not in repr(settings.describe())


def test_field_defaults_are_what_an_empty_environment_gives(tmp_path):
    """Code that builds `Settings` directly gets the catalogue's defaults (a field once said 64 where the catalogue said 8)."""
    import dataclasses

    read = Settings.from_env({"LLMCF_HOME": str(tmp_path)})
    for field in dataclasses.fields(Settings):
        if field.default is not dataclasses.MISSING:
            assert getattr(read, field.name) == field.default, field.name


def test_docs_state_the_catalogue_defaults():
    import re

    page = (Path(__file__).parents[2] / "docs" / "settings.md").read_text()
    documented = dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", page, flags=re.M))
    drifted = {s.env: (s.default, documented[s.env]) for s in SETTINGS
               if s.default is not None and s.env in documented and documented[s.env] != s.default}
    assert not drifted, f"docs/settings.md default differs from the catalogue (catalogue, docs): {drifted}"
    assert len(documented) >= 20, "the settings table's format changed: this test no longer reads it"
