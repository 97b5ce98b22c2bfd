"""ModSecurity v3 + OWASP CRS through blindfold's ctypes binding (Debian's libmodsecurity3)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from blindfold.origin import allocator
from blindfold.waf.engine import CrsSettings, Exclusion, ModSecurityEngine, PathMode, build_rules

CLIENT = ("192.0.2.10", 40000)
SERVER = ("127.0.0.1", 443)
UA = [(b"host", b"example.test"), (b"user-agent", b"Mozilla/5.0"), (b"accept", b"*/*")]


@pytest.fixture(scope="module")
def engine() -> ModSecurityEngine:
    return ModSecurityEngine(CrsSettings(paranoia_level=1))


def run(
    engine: ModSecurityEngine,
    method: bytes,
    uri: bytes,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Any:
    tx = engine.transaction("t", CLIENT, SERVER)
    verdict = tx.request_headers(method, uri, "1.1", headers or UA)
    if verdict is None:
        if body:
            tx.request_body(body)
        verdict = tx.end_request()
    return verdict, tx.finish()


def test_sql_injection_in_the_query_is_blocked(engine: ModSecurityEngine) -> None:
    verdict, matches = run(engine, b"GET", b"/item?id=1%27%20OR%201=1--")
    assert verdict is not None and verdict.status == 403
    assert 949110 in verdict.rule_ids  # the anomaly threshold
    assert 942100 in {m.rule_id for m in matches}  # libinjection SQLi


def test_attack_in_a_form_body_is_blocked(engine: ModSecurityEngine) -> None:
    form = [
        *UA,
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"content-length", b"40"),
    ]
    verdict, _ = run(engine, b"POST", b"/login", b"user=admin&pass=<script>alert(1)</script>", form)
    assert verdict is not None and verdict.status == 403


def test_benign_requests_pass(engine: ModSecurityEngine) -> None:
    for uri in (b"/", b"/index.html?q=hello+world", b"/api/items/42?sort=name"):
        verdict, matches = run(engine, b"GET", uri)
        assert verdict is None and matches == [], uri


def test_detect_mode_never_blocks_but_reports() -> None:
    detect = ModSecurityEngine(CrsSettings(mode="detect"))
    verdict, matches = run(detect, b"GET", b"/?id=1%27%20OR%201=1--")
    assert verdict is None
    assert 942100 in {m.rule_id for m in matches}


def test_path_exclusions() -> None:
    engine = ModSecurityEngine(
        CrsSettings(exclusions=(Exclusion("/search", (942100,)), Exclusion("/raw", ())))
    )
    assert run(engine, b"GET", b"/search?q=1%27%20OR%201=1--")[0] is None
    assert run(engine, b"GET", b"/raw?q=<script>alert(1)</script>")[0] is None
    assert run(engine, b"GET", b"/other?q=1%27%20OR%201=1--")[0] is not None


@pytest.fixture(scope="module")
def webhook() -> ModSecurityEngine:
    return ModSecurityEngine(CrsSettings(exclusions=(Exclusion("/webhook", ()),)))


@pytest.mark.parametrize(
    "uri",
    [
        b"/webhook/../login?id=1%27%20OR%201=1--",
        b"/webhookX/a?id=1%27%20OR%201=1--",
        b"/webhook%2F..%2Flogin?id=1%27%20OR%201=1--",
        b"/x/..//webhookz?id=1%27%20OR%201=1--",
    ],
)
def test_an_exclusion_covers_its_segment_only(webhook: ModSecurityEngine, uri: bytes) -> None:
    """Issue 8 finding 3: an exclusion for /webhook disabled the WAF for any target whose raw
    text began with /webhook."""
    assert run(webhook, b"GET", uri)[0] is not None


@pytest.mark.parametrize(
    "uri", [b"/webhook?id=1%27%20OR%201=1--", b"/a/..//%77ebhook/x?id=1%27%20OR%201=1--"]
)
def test_an_exclusion_covers_every_spelling_of_its_path(
    webhook: ModSecurityEngine, uri: bytes
) -> None:
    assert run(webhook, b"GET", uri)[0] is None


def test_a_client_cannot_switch_an_exclusion_on(webhook: ModSecurityEngine) -> None:
    forged = [*UA, (b"x-blindfold-waf-exclusion-0", b"1"), (b"X-Blindfold-Waf-Exclusion-0", b"")]
    assert run(webhook, b"GET", b"/login?id=1%27%20OR%201=1--", headers=forged)[0] is not None


def test_allowed_methods() -> None:
    strict = ModSecurityEngine(CrsSettings())
    rest = ModSecurityEngine(CrsSettings(allowed_methods="GET HEAD POST OPTIONS PUT DELETE"))
    assert run(strict, b"DELETE", b"/items/1")[0] is not None  # CRS 911100
    assert run(rest, b"DELETE", b"/items/1")[0] is None


def test_allowed_content_types() -> None:
    octet = [*UA, (b"content-type", b"application/octet-stream"), (b"content-length", b"4")]
    assert (
        run(ModSecurityEngine(CrsSettings()), b"POST", b"/up", b"\x00\x01\x02\x03", octet)[0]
        is not None
    )  # CRS 920420
    uploads = ModSecurityEngine(
        CrsSettings(
            allowed_content_types="application/x-www-form-urlencoded application/octet-stream"
        )
    )
    assert run(uploads, b"POST", b"/up", b"\x00\x01\x02\x03", octet)[0] is None


def test_bad_rules_file_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.conf"
    bad.write_text("SecNoSuchDirective On\n")
    from blindfold.waf.modsecurity import ModSecurityError

    with pytest.raises(ModSecurityError, match="rules failed to load"):
        ModSecurityEngine(CrsSettings(extra_rules_files=(str(bad),)))


# ---------------------------------------------------------------- tuning: args, modes, variables


def test_an_argument_exclusion_blinds_its_rules_to_that_argument_only() -> None:
    from blindfold.waf.engine import PathMode  # noqa: F401  (the public names exist)

    sqli = b"1%27%20union%20select%20password%20from%20users--"
    excl = Exclusion("/search", (942100, 942190, 942270, 942360), ("q",))
    e = ModSecurityEngine(CrsSettings(exclusions=(excl,)))
    assert run(e, b"GET", b"/search?q=" + sqli)[0] is None  # excluded: q on /search
    assert run(e, b"GET", b"/search/deeper?q=" + sqli)[0] is None  # below the prefix
    assert run(e, b"GET", b"/search?other=" + sqli)[0] is not None  # another argument
    assert run(e, b"GET", b"/find?q=" + sqli)[0] is not None  # another path
    # a rule the exclusion does not name still looks at q: an XSS there is blocked
    assert run(e, b"GET", b"/search?q=%3Cscript%3Ealert(1)%3C/script%3E")[0] is not None


def test_an_argument_exclusion_without_rules_covers_every_crs_rule_for_it() -> None:
    e = ModSecurityEngine(CrsSettings(exclusions=(Exclusion("/post", (), ("body",)),)))
    assert run(e, b"GET", b"/post?body=%3Cscript%3Ealert(1)%3C/script%3E")[0] is None
    assert run(e, b"GET", b"/post?x=%3Cscript%3Ealert(1)%3C/script%3E")[0] is not None


def test_matches_name_the_variable_and_the_points(engine: ModSecurityEngine) -> None:
    _, matches = run(engine, b"GET", b"/item?id=1%27%20OR%201=1--&c=%3Cscript%3E")
    by_rule = {m.rule_id: m for m in matches}
    assert by_rule[942100].variable == "ARGS:id"  # "found within" (libinjection)
    assert any(m.variable == "ARGS:c" for m in matches)  # "against variable" (@rx)
    assert by_rule[942100].points == 5  # CRITICAL


def test_path_modes_longest_prefix_and_hostname_first() -> None:
    from blindfold.waf.engine import PathMode

    e = ModSecurityEngine(
        CrsSettings(
            modes=(
                PathMode("/beta", "detect"),
                PathMode("/beta/admin", "block"),
                PathMode("/beta", "block", ("shop.example",)),
            )
        )
    )
    assert e.mode_for("/beta/x", "other.example") == "detect"
    assert e.mode_for("/beta/x", "shop.example") == "block"  # the hostname's entry first
    assert e.mode_for("/beta/admin/x", "other.example") == "block"  # longer prefix
    assert e.mode_for("/betamax", "other.example") == "block"  # whole segments only
    assert e.mode_for("/", "other.example") == "block"  # the global mode
    attack = b"/beta/x?id=1%27%20OR%201=1--"
    tx = e.transaction("t", CLIENT, SERVER)
    assert tx.request_headers(b"GET", attack, "1.1", UA) is None and tx.end_request() is None
    assert tx.mode == "detect" and any(m.rule_id == 949110 for m in tx.finish())
    # a client cannot switch a path to detect with the marker header: its value is secret
    forged = [*UA, (b"x-blindfold-waf-mode", b"detect")]
    assert run(e, b"GET", b"/other?id=1%27%20OR%201=1--", headers=forged)[0] is not None


def test_a_global_detect_mode_can_block_one_path() -> None:
    from blindfold.waf.engine import PathMode

    e = ModSecurityEngine(CrsSettings(mode="detect", modes=(PathMode("/admin", "block"),)))
    assert run(e, b"GET", b"/admin/x?id=1%27%20OR%201=1--")[0] is not None
    assert run(e, b"GET", b"/shop?id=1%27%20OR%201=1--")[0] is None


@pytest.mark.skipif(
    allocator.resolve("auto") is None, reason="mimalloc is not installed (libmimalloc2.0)"
)
def test_blocks_under_a_preloaded_allocator() -> None:
    """The intervention strings ModSecurity mallocs are freed with the free() that pairs with
    that malloc: under LD_PRELOAD=mimalloc (origin workers) libc.so.6's own free() aborts."""
    script = (
        "from blindfold.waf.engine import CrsSettings, ModSecurityEngine\n"
        "e = ModSecurityEngine(CrsSettings(paranoia_level=1))\n"
        "for _ in range(3):\n"
        "    tx = e.transaction('t', ('192.0.2.10', 1), ('127.0.0.1', 443))\n"
        "    v = tx.request_headers(b'GET', b'/?id=1%27%20OR%201=1--', '1.1',"
        " [(b'host', b'example.test')])\n"
        "    v = v or tx.end_request()\n"
        "    assert v is not None and v.status == 403, v\n"
        "    tx.finish()\n"
        "print('blocked')\n"
    )
    env = {**os.environ, "LD_PRELOAD": str(allocator.resolve("auto"))}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "blocked", done.stderr[-2000:]


def test_the_operators_phase_5_rules_run_on_every_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The logging phase is skipped for a transaction nothing matched in (the CRS rules there
    need a score) unless the operator adds rules of their own: those may log anything."""
    rules = tmp_path / "phase5.conf"
    rules.write_text("SecAction \"id:9999001,phase:5,pass,log,msg:'phase 5 ran'\"\n")
    own = ModSecurityEngine(CrsSettings(paranoia_level=1, extra_rules_files=(str(rules),)))
    verdict, matches = run(own, b"GET", b"/products?q=shoes")
    assert verdict is None and [m.rule_id for m in matches] == [9999001]
    verdict, matches = run(own, b"GET", b"/item?id=1%27%20OR%201=1--")
    assert verdict is not None and 9999001 in {m.rule_id for m in matches}


def test_a_benign_request_logs_nothing_and_an_attack_its_rules(engine: ModSecurityEngine) -> None:
    assert run(engine, b"GET", b"/products?q=blue+shoes&page=2") == (None, [])
    verdict, matches = run(engine, b"GET", b"/item?id=1%27%20OR%201=1--")
    assert verdict is not None and {m.rule_id for m in matches} == {942100}


def test_mode_marker_rules_only_when_modes_are_configured() -> None:
    """Each rule costs every request an evaluation: the path-mode markers' rules exist only
    for a config with `modes` (markers() adds the header only then)."""
    assert "id:1100000," not in build_rules(CrsSettings(), "t")
    with_modes = build_rules(CrsSettings(modes=(PathMode("/a", "detect"),)), "t")
    assert "id:1100000," in with_modes and "id:1100001," in with_modes
