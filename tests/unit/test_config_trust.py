"""The configuration keys of the second attack review's fixes (atk-trust): the edges' own
counter names on Redis, the origin's edges, PROXY header authentication, the decision
stream's per-edge limits. Errors name the dotted key."""

from __future__ import annotations

import pytest

from blindfold.config import loads
from blindfold.errors import ConfigError
from tests.unit.test_config import GOOD

REDIS = "\n[edge.decisions]\nsigner_public_keys = ['p']\n"


@pytest.mark.parametrize(
    ("decisions", "name", "peers"),
    [
        ("redis_url = 'redis://127.0.0.1/0'", "default", ()),
        ("redis_url = 'rediss://edge1:pw@redis.internal/0'", "edge1", ()),
        (
            "redis_url = 'rediss://edge1:pw@redis.internal/0'\n"
            "rate_redis_url = 'rediss://e-7:pw@counters.internal/0'\nrate_peers = ['edge2', 'e-7']",
            "e-7",
            ("edge2", "e-7"),
        ),
        ("redis_url = 'rediss://u%2Fx:pw@r.internal/0'\nrate_name = 'edge4'", "edge4", ()),
    ],
)
def test_an_edges_counter_name(decisions: str, name: str, peers: tuple[str, ...]) -> None:
    cfg = loads(GOOD + REDIS + decisions + "\n").edge
    assert cfg is not None and cfg.decisions is not None
    assert cfg.decisions.counter_name == name
    assert cfg.decisions.rate_peers == peers


@pytest.mark.parametrize(
    ("decisions", "key", "words"),
    [
        ("redis_url = 'rediss://a%3Ab:pw@r.internal/0'", "rate_name", "user name"),
        ("redis_url = 'redis://127.0.0.1/0'\nrate_name = 'edge*'", "rate_name", "letters"),
        ("redis_url = 'redis://127.0.0.1/0'\nrate_peers = ['ok', 'a:b']", "rate_peers[1]", "'.'"),
        ("rate_peers = ['edge2']", "redis_url", "shared counters"),
        (
            "redis_url = 'redis://127.0.0.1/0'\nrate_redis_url = 'redis://10.0.0.1/0'",
            "rate_redis_url",
            "TLS",
        ),
    ],
)
def test_counter_settings_errors_name_the_key(decisions: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(GOOD + REDIS + decisions + "\n")
    assert info.value.key == f"edge.decisions.{key}", str(info.value)
    assert words in str(info.value)
