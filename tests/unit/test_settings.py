"""Settings from the environment: a wrong value is one line naming its variable."""

from __future__ import annotations

import os

import pytest

from driverscore.errors import ConfigError
from driverscore.settings import KafkaConfig, load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DRIVERSCORE_"):
            monkeypatch.delenv(name)


def _error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_list_that_is_not_json_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, "DRIVERSCORE_SERVICE__TOKENS", "plaintext")
    assert message.startswith("setting DRIVERSCORE_SERVICE__TOKENS: not valid JSON")
    assert '["a", "b"]' in message


def test_a_plain_nested_value_beside_a_bad_list_is_not_blamed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # HOST is plain text (not JSON) and fine; TOKENS is the list that is not JSON.
    monkeypatch.setenv("DRIVERSCORE_SERVICE__HOST", "0.0.0.0")
    message = _error(monkeypatch, "DRIVERSCORE_SERVICE__TOKENS", "plaintext")
    assert "DRIVERSCORE_SERVICE__TOKENS" in message
    assert "HOST" not in message


def test_an_object_that_is_not_json_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, "DRIVERSCORE_FEATURES", "{bad")
    assert message.startswith("setting DRIVERSCORE_FEATURES: not valid JSON")


def test_an_invalid_nested_value_names_the_nested_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = _error(monkeypatch, "DRIVERSCORE_GATE__MIN_ROC_AUC", "2")
    assert message.startswith("setting DRIVERSCORE_GATE__MIN_ROC_AUC: ")
    assert "less than or equal to 1" in message


def test_an_invalid_value_inside_a_json_object_names_the_object_and_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = _error(monkeypatch, "DRIVERSCORE_GATE", '{"min_roc_auc": 3}')
    assert message.startswith("setting DRIVERSCORE_GATE (min_roc_auc): ")


def test_valid_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIVERSCORE_SERVICE__TOKENS", '["a", "b"]')
    monkeypatch.setenv("DRIVERSCORE_GATE__MIN_ROC_AUC", "0.8")
    settings = load_settings()
    assert [t.get_secret_value() for t in settings.service.tokens] == ["a", "b"]
    assert settings.gate.min_roc_auc == 0.8


def test_s3_requests_give_up_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIVERSCORE_S3_CONNECT_TIMEOUT_S", "2")
    config = load_settings().storage_options()["config_kwargs"]
    assert config == {
        "connect_timeout": 2.0,
        "read_timeout": 60.0,
        "retries": {"total_max_attempts": 3, "mode": "standard"},
    }


def test_the_commit_interval_follows_the_guarantee_unless_it_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert KafkaConfig().commit_interval_s == 0.2
    assert KafkaConfig(processing_guarantee="exactly-once").commit_interval_s == 0.1
    assert (
        KafkaConfig(processing_guarantee="exactly-once", commit_interval_s=0.5).commit_interval_s
        == 0.5
    )
    monkeypatch.setenv("DRIVERSCORE_KAFKA__PROCESSING_GUARANTEE", "exactly-once")
    assert load_settings().kafka.commit_interval_s == 0.1
    monkeypatch.setenv("DRIVERSCORE_KAFKA__COMMIT_INTERVAL_S", "0.3")
    assert load_settings().kafka.commit_interval_s == 0.3
    # A configuration written out and read back keeps its interval.
    config = KafkaConfig(processing_guarantee="exactly-once")
    assert KafkaConfig.model_validate_json(config.model_dump_json()) == config
