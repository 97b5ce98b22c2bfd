"""Config checks that guard a promise: where secrets may travel, what may claim a visitor's
address, which paths a rule covers. Every refusal names its key."""

from __future__ import annotations

import pytest

from blindfold.config import loads
from blindfold.errors import ConfigError

EDGE = """
[edge]
listen = ["127.0.0.1:8443"]

[[edge.routes]]
sni = ["example.test"]
origins = ["127.0.0.1:9443"]

[edge.decisions]
api_key_file = "edge.key"
"""


@pytest.mark.parametrize(
    "url",
    [
        # issue 8 finding 11: the host is decisions.example, not 127.0.0.1
        "http://127.0.0.1@decisions.example:8089",
        "http://127.0.0.1:x@decisions.example:8089",
        "https://user:pw@decisions.example:8089",
        "http://decisions.example:8089",
        "http://127.example:8089",
        "http://[::ffff:10.0.0.1]:8089",
        "https://decisions.example:99999",
        "https://decisions.example:8089/?x=1",
        "https://decisions.example:8089/#x",
        "ftp://decisions.example",
        "https://",
    ],
)
def test_a_decisions_url_that_could_leak_the_key_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        loads(EDGE + f'url = "{url}"\n')
    assert exc.value.key == "edge.decisions.url"


@pytest.mark.parametrize(
    "url",
    [
        "https://decisions.example:8089",
        "https://10.0.0.1:8089/crowdsec",
        "http://127.0.0.1:8089",
        "http://127.9.9.9:8089",
        "http://[::1]:8089",
    ],
)
def test_good_decisions_urls(url: str) -> None:
    cfg = loads(EDGE + f'url = "{url}"\n')
    assert cfg.edge is not None and cfg.edge.decisions is not None
    assert cfg.edge.decisions.url == url


@pytest.mark.parametrize("prefix", ["/%zz", "/a%00", "login", "/a\\\\b"])
def test_a_path_prefix_that_is_no_path_is_refused(prefix: str) -> None:
    text = f"""
[origin]
upstream = "http://127.0.0.1:8080"
listen = []
proxy_protocol = "off"

[[origin.decisions.rate_rules]]
path_prefix = "{prefix}"
rate_per_s = 1
"""
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert exc.value.key == "origin.decisions.rate_rules[0].path_prefix"
