"""Inputs that broke a parser's contract under the fuzz targets (fuzz/targets.py), each fed to
the parser itself, asserting the error the parser documents. The raw inputs are also kept in
fuzz/crashes/TARGET/ and replayed through the targets by tests/unit/test_fuzz_targets.py."""

from __future__ import annotations

import pytest

from blindfold.config import loads
from blindfold.decisions.core import parse_duration, parse_stream
from blindfold.decisions.feed import decode_stream
from blindfold.decisions.signed import DecisionVerifier
from blindfold.errors import ConfigError, ProtocolError
from fuzz.targets import _decision_key, seal_decision

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
EDGE = '[edge]\nlisten = ["127.0.0.1:1"]\n{extra}\n[[edge.routes]]\nsni = ["a.test"]\n'
EDGE += 'origins = ["127.0.0.1:2"]\n'


def test_decision_stream_nested_too_deeply_is_a_protocol_error() -> None:
    """json.loads raised RecursionError, which the feed's poll loop does not catch: the task
    following the decision source died and the edge stopped learning new bans."""
    with pytest.raises(ProtocolError) as exc:
        decode_stream(DEEP_JSON)
    assert exc.value.reason == "bad_stream"


@pytest.mark.parametrize("digits", [310, 400, 5000])
def test_a_duration_too_long_for_a_float_is_refused(digits: int) -> None:
    """'999…9h' parsed to inf: a ban that never expires, and format_duration(inf) raises."""
    with pytest.raises(ProtocolError) as exc:
        parse_duration("9" * digits + "h")
    assert exc.value.reason == "bad_decision"
    new, _deleted, problems = parse_stream(
        {"new": [{"scope": "ip", "value": "203.0.113.7", "duration": "9" * digits + "s"}]}
    )
    assert new == [] and len(problems) == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (DEEP_JSON, "unsigned"),  # longer than any decision: refused before it is decoded
        (b"[" * 1100 + b"]" * 10, "bad_decision"),  # deep enough for RecursionError
        (b'{"scope":"ip","value":"203.0.113.7","until":1e999,"issued":1,"reason":"x"}', ""),
        (b'{"scope":"ip","value":"203.0.113.7","until":"inf","issued":1,"reason":"x"}', ""),
        (b'{"scope":"ip","value":"203.0.113.7","until":NaN,"issued":1,"reason":"x"}', ""),
        (b'{"scope":"ip","value":"203.0.113.7","until":"-Infinity","issued":1,"reason":"x"}', ""),
    ],
    ids=["deep", "deep-short", "1e999", "inf-text", "nan", "-inf"],
)
def test_a_bad_redis_message_is_dropped(payload: bytes, reason: str) -> None:
    """Even signed by the origin, a payload that is not a sane decision is refused
    (bad_decision; the feed drops and counts it): RecursionError escaped and ended the edge's
    Redis follower; an infinite 'until' banned forever."""
    message = seal_decision(payload)
    with pytest.raises(ProtocolError) as exc:
        DecisionVerifier([_decision_key().public_key()]).admit(message, 1_800_000_000.0)
    assert exc.value.reason == (reason or "bad_decision")


@pytest.mark.parametrize("value", ["nan", "+nan", "-nan", "inf", "-inf", "+inf"])
def test_a_non_finite_number_names_the_key(value: str) -> None:
    """TOML allows nan and inf; a NaN deadline compares false with everything, so it
    silently disabled its check (hello_timeout_s = nan never timed out)."""
    with pytest.raises(ConfigError) as exc:
        loads(EDGE.format(extra=f"hello_timeout_s = {value}"))
    assert "edge.hello_timeout_s" in str(exc.value) and "finite" in str(exc.value)


def test_toml_nested_too_deeply_is_a_config_error() -> None:
    """tomllib recursed until RecursionError: `check-config` printed a traceback instead of
    a message, and exit code 2."""
    with pytest.raises(ConfigError) as exc:
        loads("a = " + "[" * 5000 + "]" * 5000)
    assert "TOML" in str(exc.value)
