"""Where commands find the Kafka broker, how an absent one is reported, and cluster ids."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from driverscore.adapters.kafka.broker import (
    BOOTSTRAP_SETTING,
    BROKER_SCRIPT,
    BrokerError,
    broker_state_dir,
    require_broker,
    resolve_bootstrap,
)
from driverscore.adapters.kafka.cluster_id import new_cluster_id
from driverscore.settings import KafkaConfig, Settings

URL_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def _valid_cluster_id(text: str) -> bool:
    if not URL_SAFE_ID.fullmatch(text) or text.startswith("-"):
        return False
    return len(base64.urlsafe_b64decode(text + "==")) == 16


def test_cluster_ids_never_start_with_a_dash() -> None:
    # Without the redraw, one id in 64 starts with '-': 20 000 draws would hit ~300 times.
    ids = [new_cluster_id() for _ in range(20_000)]
    assert all(_valid_cluster_id(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_cluster_id_that_would_start_with_a_dash_is_drawn_again() -> None:
    # 0xF8 = 111110.. : the first base64 character is '-'.
    draws = iter([b"\xf8" + bytes(15), b"\x01" * 16])
    expected = base64.urlsafe_b64encode(b"\x01" * 16).rstrip(b"=").decode()
    assert new_cluster_id(lambda: next(draws)) == expected


def test_the_broker_script_uses_the_cluster_id_module() -> None:
    # broker.sh runs the module as a file in isolated mode; it must work that way too.
    script = BROKER_SCRIPT.read_text()
    assert '"$py" -I "$here/cluster_id.py"' in script
    out = subprocess.run(
        [sys.executable, "-I", str(BROKER_SCRIPT.with_name("cluster_id.py"))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert _valid_cluster_id(out.stdout.strip())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DRIVERSCORE_* variable from the caller's shell; a fresh home in tmp_path."""
    for name in list(os.environ):
        if name.startswith("DRIVERSCORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DRIVERSCORE_HOME", str(tmp_path))
    return tmp_path


def _record(home: Path, bootstrap: str) -> None:
    state = broker_state_dir(home)
    state.mkdir(parents=True, exist_ok=True)
    (state / "bootstrap").write_text(bootstrap + "\n")


def test_without_setting_or_record_the_default_is_used(clean_env: Path) -> None:
    address = resolve_bootstrap(Settings())
    assert (address.bootstrap_servers, address.origin) == ("127.0.0.1:9092", "default")


def test_the_address_recorded_by_kafka_up_is_used_without_a_setting(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _record(clean_env, "127.0.0.1:40123")
    # Other Kafka settings do not count as choosing a broker.
    monkeypatch.setenv("DRIVERSCORE_KAFKA__GRACE_S", "90")
    address = resolve_bootstrap(Settings())
    assert (address.bootstrap_servers, address.origin) == ("127.0.0.1:40123", "recorded")
    assert address.state_dir == (clean_env / "kafka").resolve()


def test_an_empty_record_is_no_record(clean_env: Path) -> None:
    _record(clean_env, "")
    assert resolve_bootstrap(Settings()).origin == "default"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        (BOOTSTRAP_SETTING, "broker-a:9092"),
        ("DRIVERSCORE_KAFKA", '{"bootstrap_servers": "broker-a:9092"}'),
    ],
)
def test_an_explicit_setting_wins_over_the_record(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    _record(clean_env, "127.0.0.1:40123")
    monkeypatch.setenv(variable, value)
    address = resolve_bootstrap(Settings())
    assert (address.bootstrap_servers, address.origin) == ("broker-a:9092", "setting")


def test_a_setting_equal_to_the_default_is_still_explicit(clean_env: Path) -> None:
    _record(clean_env, "127.0.0.1:40123")
    settings = Settings(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"))
    assert resolve_bootstrap(settings).origin == "setting"


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound without listening: connections are refused and nobody else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_an_unreachable_broker_is_one_error_naming_address_origin_and_remedy(
    clean_env: Path, dead_port: int
) -> None:
    _record(clean_env, f"127.0.0.1:{dead_port}")
    started = time.monotonic()
    with pytest.raises(BrokerError) as raised:
        require_broker(Settings())
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "\n" not in message
    assert f"127.0.0.1:{dead_port}" in message
    assert "recorded by `driverscore kafka up`" in message
    assert "driverscore kafka up" in message


def _run_timed(args: list[str], env: dict[str, str], cwd: Path) -> tuple[str, int, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stderr, done.returncode, time.monotonic() - started


@pytest.mark.parametrize(
    "command",
    [["kafka", "init"], ["kafka", "produce", "pings.csv"], ["stream"]],
    ids=["init", "produce", "stream"],
)
def test_a_command_reports_an_unreachable_broker_within_5_s(
    clean_env: Path, dead_port: int, command: list[str]
) -> None:
    # The variable names the broker: the message must say so, not suggest `kafka up`.
    env = {**os.environ, BOOTSTRAP_SETTING: f"127.0.0.1:{dead_port}"}
    stderr, returncode, elapsed = _run_timed(command, env, clean_env)
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"127.0.0.1:{dead_port}" in lines[0]
    assert BOOTSTRAP_SETTING in lines[0]
    assert "Traceback" not in stderr
    # On a machine busy with other work, interpreter start-up alone can take seconds: then
    # the wait for the broker, beyond what any command costs to start, is what must be short.
    *_, start_up = _run_timed(["version"], env, clean_env)
    assert elapsed < 5 or elapsed - start_up < 3.5, f"{elapsed:.1f}s (start-up {start_up:.1f}s)"
