"""Config checks that guard a promise: where secrets may travel, what may claim a visitor's
address, which paths a rule covers. Every refusal names its key."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from blindfold import pki
from blindfold.cli.main import main
from blindfold.config import loads
from blindfold.config.common import load_admin_token
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


_WAF_ORIGIN = """
[origin]
upstream = "http://127.0.0.1:8080"
listen = []
proxy_protocol = "off"
"""


@pytest.mark.parametrize(
    ("table", "key"),
    [
        # an argument name goes into a ModSecurity ctl: action: nothing that could end it
        ('[[origin.waf.exclusions]]\npath_prefix = "/a"\nargs = ["q;ARGS:x"]', "args"),
        ('[[origin.waf.exclusions]]\npath_prefix = "/a"\nargs = ["q\\"x"]', "args"),
        ('[[origin.waf.exclusions]]\npath_prefix = "/a"\nargs = ["a b"]', "args"),
        ('[[origin.waf.exclusions]]\npath_prefix = "/a"\nargs = [""]', "args"),
        ('[[origin.waf.modes]]\npath_prefix = "/a"\nmode = "off"', "mode"),
        ('[[origin.waf.modes]]\npath_prefix = "a"\nmode = "detect"', "path_prefix"),
        (
            '[[origin.waf.modes]]\npath_prefix = "/a"\nmode = "detect"\nhostnames = ["A.x"]',
            "hostnames",
        ),
    ],
)
def test_waf_tuning_keys_are_checked(table: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        loads(_WAF_ORIGIN + table)
    assert f"[0].{key}" in exc.value.key, exc.value.key


def test_waf_tuning_keys_load() -> None:
    cfg = loads(
        _WAF_ORIGIN
        + """
[[origin.waf.exclusions]]
path_prefix = "/search"
rule_ids = [942100]
args = ["q", "json.comment", "items[]"]

[[origin.waf.modes]]
path_prefix = "/beta"
mode = "detect"
hostnames = ["shop.example"]
"""
    )
    assert cfg.origin is not None
    assert cfg.origin.waf.exclusions[0].args == ("q", "json.comment", "items[]")
    assert cfg.origin.waf.modes[0].hostnames == ("shop.example",)


# ---------------------------------------------------------------------- check-config
@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ca = pki.make_ca()
    pki.issue(ca, ["example.test", "origin.example.test"]).write(
        tmp_path / "site.pem", tmp_path / "site.key"
    )
    pki.issue(ca, ["decisions.internal"]).write(tmp_path / "dec.pem", tmp_path / "dec.key")
    (tmp_path / "keys.txt").write_text("edge1:0123456789abcdef0123\n")
    return {
        "dir": tmp_path,
        "site": tmp_path / "site.pem",
        "site_key": tmp_path / "site.key",
        "dec": tmp_path / "dec.pem",
        "dec_key": tmp_path / "dec.key",
        "keys": tmp_path / "keys.txt",
    }


def _origin(files: dict[str, Path], origin: str = "", decisions: str = "") -> str:
    return f"""
[origin]
upstream = "http://127.0.0.1:8080"
listen = ["127.0.0.1:9443"]
trusted_edges = ["127.0.0.1/32"]
{origin}

[[origin.certificates]]
cert = "{files["site"]}"
key = "{files["site_key"]}"

[origin.decisions]
listen = "127.0.0.1:8089"
api_keys_file = "{files["keys"]}"
{decisions or f'cert = "{files["dec"]}"{chr(10)}key = "{files["dec_key"]}"'}
"""


def _check(
    files: dict[str, Path], text: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    path = files["dir"] / "t.toml"
    path.write_text(text)
    code = main(["check-config", str(path)])
    return code, capsys.readouterr().err


def test_check_config_accepts_a_good_origin(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _check(files, _origin(files), capsys) == (0, "")


@pytest.mark.parametrize("everything", ["0.0.0.0/0", "::/0"])
def test_trusting_every_address_is_an_error_unless_allowed(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], everything: str
) -> None:
    """Issue 15 finding 14: anyone could then claim any visitor address."""
    text = _origin(files).replace('"127.0.0.1/32"', f'"127.0.0.1/32", "{everything}"')
    code, err = _check(files, text, capsys)
    assert code == 2 and "origin.trusted_edges[1]" in err
    allowed = text.replace("[origin]\n", "[origin]\ntrust_any_address = true\n")
    assert _check(files, allowed, capsys)[0] == 0


def test_listeners_on_every_address_are_warned_about(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    token = files["dir"] / "admin.token"
    token.write_text("0123456789abcdef-admin\n")
    token.chmod(0o600)
    text = _origin(files, f'admin_listen = "0.0.0.0:9101"\nadmin_token_file = "{token}"').replace(
        'listen = "127.0.0.1:8089"', 'listen = "[::]:8089"'
    )
    code, err = _check(files, text, capsys)
    assert code == 0
    assert "warning: origin.admin_listen" in err and "warning: origin.decisions.listen" in err
    edge = EDGE.split("[edge.decisions]")[0].replace(
        'listen = ["127.0.0.1:8443"]',
        f'listen = ["127.0.0.1:8443"]\nadmin_listen = "0.0.0.0:9100"\nadmin_token_file = "{token}"',
    )
    code, err = _check(files, edge, capsys)
    assert code == 0 and "warning: edge.admin_listen" in err


def test_the_decision_stream_needs_a_certificate_of_its_own(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15 finding 8: by default it showed the site's certificate to anyone."""
    missing = _origin(files, decisions="# no certificate")
    code, err = _check(files, missing, capsys)
    assert code == 2 and "origin.decisions.cert" in err
    site = _origin(files, decisions=f'cert = "{files["site"]}"\nkey = "{files["site_key"]}"')
    code, err = _check(files, site, capsys)
    assert code == 2 and "origin.decisions.cert" in err and "example.test" in err


@pytest.mark.parametrize("address", ["0.0.0.0:9101", "10.1.2.3:9101", "[::]:9101"])
def test_an_admin_listener_off_loopback_needs_a_token(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], address: str
) -> None:
    """Issue 13: its /metrics and /status.json would be anyone's to read."""
    edge = EDGE.split("[edge.decisions]")[0].replace(
        'listen = ["127.0.0.1:8443"]', f'listen = ["127.0.0.1:8443"]\nadmin_listen = "{address}"'
    )
    code, err = _check(files, edge, capsys)
    assert code == 2 and "edge.admin_token_file" in err, err
    code, err = _check(files, _origin(files, f'admin_listen = "{address}"'), capsys)
    assert code == 2 and "origin.admin_token_file" in err, err
    short = files["dir"] / "short.token"
    short.write_text("too-short\n")
    short.chmod(0o600)
    with_short = _origin(files, f'admin_listen = "{address}"\nadmin_token_file = "{short}"')
    code, err = _check(files, with_short, capsys)
    assert code == 2 and "origin.admin_token_file" in err and "16 or more" in err, err
    missing = _origin(files, f'admin_listen = "{address}"\nadmin_token_file = "/nonexistent/t"')
    code, err = _check(files, missing, capsys)
    assert code == 2 and "origin.admin_token_file" in err, err
    # on loopback no token is needed
    assert _check(files, _origin(files, 'admin_listen = "127.0.0.2:9101"'), capsys)[0] == 0


def test_operator_keys_are_checked_like_the_origin_does(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config reads the operator keys file as the origin does at start: private (0600 or
    0640), well formed; a bad one names origin.decisions.operator_keys_file, exit 2."""
    ops = files["dir"] / "operators.txt"
    ops.write_text("alice:alice-own-key-0123456789\n")
    ops.chmod(0o600)
    line = f'operator_keys_file = "{ops}"\n'
    good = _origin(files).replace('api_keys_file = "', line + 'api_keys_file = "')
    assert _check(files, good, capsys) == (0, "")
    # attack review B: an edge's read key as an operator key (the same secret, or the edges'
    # file itself) added bans and purges; check-config passed (before: exit 0 both)
    ops.write_text("alice:alice-own-key-0123456789\nbob:0123456789abcdef0123\n")
    code, err = _check(files, good, capsys)
    assert code == 2 and "origin.decisions.operator_keys_file" in err and "'bob'" in err, err
    ops.write_text("alice:alice-own-key-0123456789\n")
    files["keys"].chmod(0o600)
    same = _origin(files).replace(
        'api_keys_file = "', f'operator_keys_file = "{files["keys"]}"\napi_keys_file = "'
    )
    code, err = _check(files, same, capsys)
    assert code == 2 and "origin.decisions.operator_keys_file" in err and "edges'" in err, err
    ops.chmod(0o644)
    code, err = _check(files, good, capsys)
    assert code == 2 and "origin.decisions.operator_keys_file" in err and "0600" in err
    ops.chmod(0o600)
    ops.write_text("alice:short\n")
    code, err = _check(files, good, capsys)
    assert code == 2 and "origin.decisions.operator_keys_file" in err


@pytest.mark.parametrize(
    ("mode", "ok"),
    [(0o600, True), (0o640, True), (0o400, True), (0o644, False), (0o660, False), (0o604, False)],
)
def test_an_admin_token_file_others_can_read_is_refused(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], mode: int, ok: bool
) -> None:
    """Attack review of issue 13, D: the token was read whatever its permissions. Like ssh
    with a key: nothing for others, nothing writable by the group (0640 for a service group)."""
    token = files["dir"] / "admin.token"
    token.write_text("0123456789abcdef-admin\n")
    token.chmod(mode)
    text = _origin(files, f'admin_listen = "10.1.2.3:9101"\nadmin_token_file = "{token}"')
    code, err = _check(files, text, capsys)
    if ok:
        assert code == 0, err
    else:
        assert code == 2 and "origin.admin_token_file" in err and oct(mode) in err, err
        assert "chmod 600" in err
    with pytest.raises(ConfigError) if not ok else contextlib.nullcontext():
        assert load_admin_token(str(token), "keyserver.admin_token_file") == (
            b"0123456789abcdef-admin"
        )


def test_an_admin_token_file_must_be_a_file_owned_by_this_user_or_root(tmp_path: Path) -> None:
    """Attack review of issue 13, 8: the owner was never checked (a 0600 token owned by
    another user, who can rewrite it, was accepted), and the mode was stat()ed before the
    file was read (a race). Now it is opened, then fstat()ed: a regular file, owned by this
    process's user or root, bounded in size."""
    token = tmp_path / "admin.token"
    token.write_text("0123456789abcdef-admin\n")
    token.chmod(0o600)
    assert load_admin_token(str(token), "origin.admin_token_file") == b"0123456789abcdef-admin"
    with pytest.raises(ConfigError, match="not a regular file"):
        load_admin_token(str(tmp_path), "origin.admin_token_file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):  # and no wait for a writer
        load_admin_token(str(fifo), "origin.admin_token_file")
    big = tmp_path / "big.token"
    big.write_text("x" * 5000)
    big.chmod(0o600)
    with pytest.raises(ConfigError, match="longer than"):
        load_admin_token(str(big), "origin.admin_token_file")
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(token, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534") as err:
        load_admin_token(str(token), "origin.admin_token_file")
    assert err.value.key == "origin.admin_token_file"
