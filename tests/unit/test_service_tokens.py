"""The service's token file: one token a line; comments and blank lines are not tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from driverscore.errors import ConfigError
from driverscore.services.api.auth import load_tokens
from driverscore.settings import ServiceConfig


def test_comment_and_blank_lines_are_not_tokens(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(
        "# fleet ops dashboard, issued 2026-01-05\n"
        "first-token\n"
        "\n"
        "   # indented comment\n"
        "  second-token  \n"
        "\t\n",
        encoding="utf-8",
    )
    config = ServiceConfig(tokens=[SecretStr("from-setting")], token_file=token_file)
    assert load_tokens(config) == [b"from-setting", b"first-token", b"second-token"]


def test_a_token_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_bytes(b"\xff\xfetoken\n")
    with pytest.raises(ConfigError, match=r"tokens: not UTF-8 text"):
        load_tokens(ServiceConfig(token_file=token_file))
