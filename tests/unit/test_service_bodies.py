"""Request bodies: nesting depth measured exactly, hostile bodies refused as BodyError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driverscore.services.api.bodies import (
    JSON_DOCUMENT,
    MAX_JSON_DEPTH,
    BodyError,
    json_depth,
    parse_json_body,
    request_json,
)


def _depth(document: Any) -> int:
    """Reference: nesting of the parsed document (containers count one level each)."""
    if isinstance(document, dict):
        return 1 + max((_depth(v) for v in document.values()), default=0)
    if isinstance(document, list):
        return 1 + max((_depth(v) for v in document), default=0)
    return 0


# Strings full of brackets, quotes and backslashes: what could fool a byte scan.
_tricky = st.text(alphabet='[]{}"\\,: aé\n\u2028', max_size=12)
_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _tricky,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_tricky, inner, max_size=4),
    max_leaves=30,
)


# Derandomized, as the Schemathesis run: CI sees the same examples every time (a random
# find once blocked a landing; it is now pinned by test_integers_beyond_64_bits_stay_exact).
@settings(derandomize=True, max_examples=300)
@given(_documents, st.booleans())
def test_depth_of_any_document_equals_its_nesting(document: Any, ascii_only: bool) -> None:
    body = json.dumps(document, ensure_ascii=ascii_only).encode()
    assert json_depth(body) == _depth(document)
    assert parse_json_body(body) == json.loads(body)


def test_brackets_inside_strings_do_not_hide_depth() -> None:
    # Closing brackets in strings must not lower the count; escaped quotes do not end strings.
    deep = json.dumps(_nest(70, ["]]]]", '\\"]]', "\\\\"]))
    assert json_depth(deep.encode()) == 71
    with pytest.raises(BodyError) as raised:
        parse_json_body(deep.encode())
    assert raised.value.kind == "body_too_deep"


def _nest(levels: int, leaf: Any) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1000 + b"]" * 1000,  # RecursionError in json.loads before the check
        b"[" * 100_000,  # unbalanced, and beyond orjson's own limit
        b'{"a":' * 65 + b"1" + b"}" * 65,
    ],
    ids=["1000 lists", "unclosed", "65 objects"],
)
def test_deep_bodies_are_refused_without_recursion(body: bytes) -> None:
    with pytest.raises(BodyError) as raised:
        parse_json_body(body)
    assert raised.value.kind == "body_too_deep"
    assert str(MAX_JSON_DEPTH) in raised.value.message


def test_depth_at_the_limit_is_accepted() -> None:
    body = json.dumps(_nest(MAX_JSON_DEPTH, 1)).encode()
    assert parse_json_body(body) == _nest(MAX_JSON_DEPTH, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"vehicle_id": "v"', "body is not valid JSON: Expecting ',' delimiter at line 1"),
        (b"", "body is not valid JSON: Expecting value at line 1 column 1"),
        (b'{"a": "\xff"}', "body is not UTF-8 text (byte 7)"),
        ('{"a": 1}'.encode("utf-16"), "body is not UTF-8 text"),
    ],
)
def test_unreadable_bodies_say_why(body: bytes, message: str) -> None:
    with pytest.raises(BodyError) as raised:
        parse_json_body(body)
    assert raised.value.kind == "invalid_json"
    assert raised.value.message.startswith(message)


def test_the_document_parsed_by_the_guard_is_used() -> None:
    assert request_json({JSON_DOCUMENT: {"parsed": True}}, b"not json") == {"parsed": True}
    assert request_json({}, b'{"a": [1]}') == {"a": [1]}
    with pytest.raises(BodyError):
        request_json({}, b"[" * 100)


def test_nan_passes_so_field_validation_can_name_it() -> None:
    assert parse_json_body(b'{"speed_mps": NaN}')["speed_mps"] != 0


@pytest.mark.parametrize(
    "text", ["-9223372036854775809", "18446744073709551616", '{"ts": 123456789012345678901}']
)
def test_integers_beyond_64_bits_stay_exact(text: str) -> None:
    # Found by the property test above: orjson turned -9223372036854775809 into a float.
    assert parse_json_body(text.encode()) == json.loads(text)
    assert type(parse_json_body(text.encode())) is type(json.loads(text))
