"""The WAF behind a small interface (`WafEngine` / `WafTransaction`), and its ModSecurity v3 +
OWASP CRS implementation. Another build of the engine (the PyPI libmodsecurity wheel, a remote
WAF) plugs in by implementing the two protocols.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from blindfold.errors import ProtocolError
from blindfold.waf.modsecurity import LOG_CB, ModSecurityError, _Intervention, lib
from blindfold.web.target import canonical_path, path_has_prefix

Headers = list[tuple[bytes, bytes]]

EXCLUSION_HEADER = "x-blindfold-waf-exclusion"
_RULE_ID = re.compile(r'\[id "(\d+)"\]')
_MSG = re.compile(r'\[msg "([^"]*)"\]')
# the variable a rule matched, as ModSecurity writes it: "against variable `ARGS:q' (Value..."
# or, for operators like @detectSQLi, "[data "Matched Data: ... found within ARGS:q: ..."]"
_VARIABLE = re.compile(r"against variable `([^'`]{1,200})' \(Value")
_SEVERITY = re.compile(r'\[severity "(\d)"\]')
# what a match adds to the CRS anomaly score, by severity (crs-setup.conf's defaults)
_POINTS = {"2": 5, "3": 4, "4": 3, "5": 2}
_FOUND_WITHIN = re.compile(r"found within ([A-Z_]+(?::[^: \]\"]{1,200})?):")
MODE_HEADER = "x-blindfold-waf-mode"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The engine's decision to interrupt a request."""

    status: int
    rule_ids: tuple[int, ...]
    message: str
    redirect: str | None = None


@dataclass(slots=True)
class Match:
    rule_id: int
    message: str
    variable: str = ""  # what the rule matched in, e.g. "ARGS:q", "REQUEST_HEADERS:User-Agent"
    points: int = 0  # what it adds to the CRS anomaly score (by its severity)


class WafTransaction(Protocol):
    mode: str  # "block" | "detect": what applies to this request (known after request_headers)

    def request_headers(
        self, method: bytes, uri: bytes, http_version: str, headers: Headers
    ) -> Verdict | None: ...
    def request_body(self, chunk: bytes) -> None: ...
    def end_request(self) -> Verdict | None: ...
    def response_headers(
        self, status: int, headers: Headers, http_version: str
    ) -> Verdict | None: ...
    def finish(self) -> list[Match]: ...


class WafEngine(Protocol):
    name: str

    def transaction(
        self, request_id: str, client: tuple[str, int], server: tuple[str, int]
    ) -> WafTransaction: ...


@dataclass(frozen=True, slots=True)
class Exclusion:
    path_prefix: str
    rule_ids: tuple[int, ...] = ()  # empty: no rule runs for this path (for `args`: no CRS rule)
    args: tuple[str, ...] = ()  # only these arguments (ARGS:name); empty: the whole request


@dataclass(frozen=True, slots=True)
class PathMode:
    path_prefix: str
    mode: Literal["block", "detect"]
    hostnames: tuple[str, ...] = ()  # empty: every hostname


@dataclass(frozen=True, slots=True)
class CrsSettings:
    paranoia_level: int = 1
    mode: Literal["block", "detect"] = "block"
    anomaly_threshold: int = 5
    body_limit_bytes: int = 13107200  # SecRequestBodyLimit
    body_no_files_limit_bytes: int = 131072  # SecRequestBodyNoFilesLimit
    body_limit_action: Literal["reject", "partial"] = "reject"
    allowed_methods: str = ""  # CRS tx.allowed_methods; "" keeps the CRS default
    allowed_content_types: str = ""  # CRS tx.allowed_request_content_type, space separated
    exclusions: tuple[Exclusion, ...] = ()
    modes: tuple[PathMode, ...] = ()
    extra_rules_files: tuple[str, ...] = ()
    crs_rules_dir: str = "/usr/share/modsecurity-crs/rules"
    crs_setup_dir: str = "/etc/modsecurity/crs"
    unicode_map_file: str = "/etc/modsecurity/unicode.mapping"
    crs_test_settings: bool = False  # the CRS regression suite's optional checks
    extra_setvars: tuple[str, ...] = field(default=())


def build_rules(s: CrsSettings, exclusion_token: str) -> str:
    """The ModSecurity configuration text: engine settings (Debian's recommended ones), the
    paranoia level, crs-setup, exclusions, the CRS rules."""
    engine = "On" if s.mode == "block" else "DetectionOnly"
    action = "Reject" if s.body_limit_action == "reject" else "ProcessPartial"
    lines = [
        f"SecRuleEngine {engine}",
        "SecRequestBodyAccess On",
        'SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\\+|/)|text/)xml" '
        "\"id:'200000',phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML\"",
        'SecRule REQUEST_HEADERS:Content-Type "^application/json" '
        "\"id:'200001',phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON\"",
        f"SecRequestBodyLimit {s.body_limit_bytes}",
        f"SecRequestBodyNoFilesLimit {s.body_no_files_limit_bytes}",
        f"SecRequestBodyLimitAction {action}",
        "SecRequestBodyJsonDepthLimit 512",
        "SecArgumentsLimit 1000",
        'SecRule &ARGS "@ge 1000" "id:\'200007\', phase:2,t:none,log,deny,status:400,'
        "msg:'Failed to fully parse request body due to large argument count',severity:2\"",
        'SecRule REQBODY_ERROR "!@eq 0" "id:\'200002\', phase:2,t:none,log,deny,status:400,'
        "msg:'Failed to parse request body.',logdata:'%{reqbody_error_msg}',severity:2\"",
        'SecRule MULTIPART_STRICT_ERROR "!@eq 0" "id:\'200003\',phase:2,t:none,log,deny,'
        "status:400,msg:'Multipart request body failed strict validation'\"",
        'SecRule MULTIPART_UNMATCHED_BOUNDARY "@eq 1" "id:\'200004\',phase:2,t:none,log,deny,'
        "msg:'Multipart parser detected a possible unmatched boundary.'\"",
        "SecPcreMatchLimit 1000",
        "SecPcreMatchLimitRecursion 1000",
        'SecRule TX:/^MSC_/ "!@streq 0" "id:\'200005\',phase:2,t:none,deny,'
        "msg:'ModSecurity internal error flagged: %{MATCHED_VAR_NAME}'\"",
        "SecResponseBodyAccess Off",
        "SecAuditEngine Off",
        "SecArgumentSeparator &",
        "SecCookieFormat 0",
    ]
    if Path(s.unicode_map_file).is_file():
        lines.append(f"SecUnicodeMapFile {s.unicode_map_file} 20127")
    setvars = [
        f"setvar:tx.paranoia_level={s.paranoia_level}",
        f"setvar:tx.inbound_anomaly_score_threshold={s.anomaly_threshold}",
        # CRS 3.3's list (rule 901 default) plus HTTP/3, which the origin serves (CRS 4 has it)
        "setvar:'tx.allowed_http_versions=HTTP/1.0 HTTP/1.1 HTTP/2 HTTP/2.0 HTTP/3 HTTP/3.0'",
    ]
    if s.crs_test_settings:
        setvars[:0] = [
            "setvar:tx.crs_validate_utf8_encoding=1",
            "setvar:tx.arg_name_length=100",
            "setvar:tx.arg_length=400",
        ]
    if s.allowed_methods:
        setvars.append(f"setvar:'tx.allowed_methods={s.allowed_methods}'")
    if s.allowed_content_types:
        types = " ".join(f"|{t}|" for t in s.allowed_content_types.split())
        setvars.append(f"setvar:'tx.allowed_request_content_type={types}'")
    setvars += [f"setvar:{v}" for v in s.extra_setvars]
    lines.append(f'SecAction "id:900000,phase:1,nolog,pass,t:none,{",".join(setvars)}"')
    setup = Path(s.crs_setup_dir)
    lines.append(f"Include {setup / 'crs-setup.conf'}")
    lines.append(f"Include {setup / 'REQUEST-900-EXCLUSION-RULES-BEFORE-CRS.conf'}")
    for i, ex in enumerate(s.exclusions):
        # which exclusions apply is decided in Python on the canonical path (web/target.py),
        # never by ModSecurity on the raw URI (`/webhook/../login` is /login); the decision
        # reaches the rules as a header only we add, whose value the client cannot guess
        if ex.args and ex.rule_ids:
            ctl = ",".join(
                f"ctl:ruleRemoveTargetById={r};ARGS:{a}" for r in ex.rule_ids for a in ex.args
            )
        elif ex.args:
            ctl = ",".join(f"ctl:ruleRemoveTargetByTag=OWASP_CRS;ARGS:{a}" for a in ex.args)
        elif ex.rule_ids:
            ctl = ",".join(f"ctl:ruleRemoveById={r}" for r in ex.rule_ids)
        else:
            ctl = "ctl:ruleEngine=Off"
        lines.append(
            f'SecRule REQUEST_HEADERS:{EXCLUSION_HEADER}-{i} "@streq {exclusion_token}" '
            f'"id:{1_000_000 + i},phase:1,pass,nolog,t:none,{ctl}"'
        )
    # a path whose mode differs from the global one (decided in Python, like exclusions);
    # without `modes` no request carries the marker: no rule to evaluate for every request
    for i, (mode, ctl) in enumerate((("detect", "DetectionOnly"), ("block", "On")) * bool(s.modes)):
        lines.append(
            f'SecRule REQUEST_HEADERS:{MODE_HEADER} "@streq {exclusion_token}-{mode}" '
            f'"id:{1_100_000 + i},phase:1,pass,nolog,t:none,ctl:ruleEngine={ctl}"'
        )
    for rules in sorted(glob.glob(str(Path(s.crs_rules_dir) / "*.conf"))):
        lines.append(f"Include {rules}")
    lines.append(f"Include {setup / 'RESPONSE-999-EXCLUSION-RULES-AFTER-CRS.conf'}")
    lines += [f"Include {f}" for f in s.extra_rules_files]
    return "\n".join(lines) + "\n"


class ModSecurityEngine:
    """One ModSecurity instance and rule set; transactions may run on any thread."""

    name = "modsecurity"

    def __init__(self, settings: CrsSettings) -> None:
        self.settings = settings
        self._lib = lib()
        L = self._lib
        for path in (settings.crs_rules_dir, settings.crs_setup_dir):
            if not Path(path).is_dir():
                raise ModSecurityError(
                    f"{path} is missing (Debian: apt-get install modsecurity-crs)"
                )
        self._ms = L.msc_init()
        L.msc_set_connector_info(self._ms, b"blindfold-origin")
        self._messages: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._log_cb = LOG_CB(self._on_log)  # keep a reference: C holds the pointer
        L.msc_set_log_cb(self._ms, self._log_cb)
        self._rules = L.msc_create_rules_set()
        error = ctypes.c_char_p()
        self._exclusion_token = secrets.token_hex(16)
        self._exclusion_prefixes = [ex.path_prefix for ex in settings.exclusions]
        text = build_rules(settings, self._exclusion_token)
        if L.msc_rules_add(self._rules, text.encode(), ctypes.byref(error)) < 0:
            raise ModSecurityError(f"rules failed to load: {(error.value or b'').decode()}")
        self.version = (L.msc_who_am_i(self._ms) or b"").decode()
        # The logging phase (5) cannot block, and the CRS rules there (RESPONSE-980) log only
        # when an anomaly score is above 0, i.e. when a scoring rule has logged a match: a
        # transaction nothing matched in skips it (~3% of a benign request's instructions).
        # Rules of the operator's own may do anything in phase 5: then it always runs.
        self.always_log_phase = bool(settings.extra_rules_files)

    def _on_log(self, data: int | None, message: int | None) -> None:
        if not data or not message:
            return
        text = ctypes.string_at(message).decode("utf-8", "replace")
        with self._lock:
            bucket = self._messages.get(data)
            if bucket is not None and len(bucket) < 200:
                bucket.append(text)

    def transaction(
        self, request_id: str, client: tuple[str, int], server: tuple[str, int]
    ) -> ModSecurityTransaction:
        key = next(self._ids)
        with self._lock:
            self._messages[key] = []
        return ModSecurityTransaction(self, key, request_id, client, server)

    def mode_for(self, path: str, host: str) -> str:
        """The mode for a canonical path and a request hostname: the longest matching
        `modes` prefix (one naming the hostname before one naming none), else the global."""
        best: tuple[int, int] = (-1, -1)
        mode: str = self.settings.mode
        for m in self.settings.modes:
            if m.hostnames and host not in m.hostnames:
                continue
            if path_has_prefix(path, m.path_prefix):
                rank = (len(m.path_prefix.rstrip("/")), 1 if m.hostnames else 0)
                if rank > best:
                    best, mode = rank, m.mode
        return mode

    def markers(self, uri: bytes, headers: Headers) -> tuple[Headers, str]:
        """The marker headers that switch on the exclusions and the path mode covering `uri`'s
        canonical path, and that mode (none when the path is not a valid one: the HTTP layer
        refuses those anyway)."""
        s = self.settings
        if not s.exclusions and not s.modes:
            return [], s.mode
        try:
            path = canonical_path(uri.partition(b"?")[0]).decode("latin-1")
        except ProtocolError:
            return [], s.mode
        token = self._exclusion_token.encode()
        out = [
            (f"{EXCLUSION_HEADER}-{i}".encode(), token)
            for i, prefix in enumerate(self._exclusion_prefixes)
            if path_has_prefix(path, prefix)
        ]
        mode: str = s.mode
        if s.modes:
            host = next((v for n, v in headers if n.lower() == b"host"), b"")
            name = host.decode("latin-1").lower().rpartition(":")
            hostname = name[0] if name[1] and not name[2].endswith("]") else name[2]
            mode = self.mode_for(path, hostname)
            if mode != s.mode:
                out.append((MODE_HEADER.encode(), token + b"-" + mode.encode()))
        return out, mode

    def has_messages(self, key: int) -> bool:
        """Whether a rule of this transaction has logged a match yet."""
        with self._lock:
            return bool(self._messages.get(key))

    def _take_messages(self, key: int) -> list[str]:
        with self._lock:
            return self._messages.pop(key, [])


class ModSecurityTransaction:
    def __init__(
        self,
        engine: ModSecurityEngine,
        key: int,
        request_id: str,
        client: tuple[str, int],
        server: tuple[str, int],
    ) -> None:
        self._e = engine
        self._L = engine._lib
        self._key = key
        self._tx = self._L.msc_new_transaction_with_id(
            engine._ms, engine._rules, request_id.encode(), ctypes.c_void_p(key)
        )
        self._done = False
        self.mode: str = engine.settings.mode
        self._L.msc_process_connection(
            self._tx, client[0].encode(), client[1], server[0].encode(), server[1]
        )

    def _intervention(self) -> Verdict | None:
        it = _Intervention()
        it.status = 200
        if not self._L.msc_intervention(self._tx, ctypes.byref(it)):
            return None
        url_p: int | None = it.url
        log_p: int | None = it.log
        status: int = it.status
        url = ctypes.string_at(url_p).decode("utf-8", "replace") if url_p else None
        log = ctypes.string_at(log_p).decode("utf-8", "replace") if log_p else ""
        if url_p:
            self._L.free(url_p)
        if log_p:
            self._L.free(log_p)
        if not it.disruptive:
            return None
        ids = tuple(int(x) for x in _RULE_ID.findall(log))
        msg = _MSG.search(log)
        return Verdict(
            status=status if status >= 300 else 403,
            rule_ids=ids,
            message=msg.group(1) if msg else log[:200],
            redirect=url,
        )

    def request_headers(
        self, method: bytes, uri: bytes, http_version: str, headers: Headers
    ) -> Verdict | None:
        L, tx = self._L, self._tx
        L.msc_process_uri(tx, uri, method, http_version.encode())
        verdict = self._intervention()
        if verdict is not None:
            return verdict
        markers, self.mode = self._e.markers(uri, headers)
        for name, value in [*headers, *markers]:
            L.msc_add_n_request_header(tx, name, len(name), value, len(value))
        L.msc_process_request_headers(tx)
        return self._intervention()

    def request_body(self, chunk: bytes) -> None:
        self._L.msc_append_request_body(self._tx, chunk, len(chunk))

    def end_request(self) -> Verdict | None:
        self._L.msc_process_request_body(self._tx)
        return self._intervention()

    def response_headers(self, status: int, headers: Headers, http_version: str) -> Verdict | None:
        L, tx = self._L, self._tx
        for name, value in headers:
            L.msc_add_n_response_header(tx, name, len(name), value, len(value))
        L.msc_process_response_headers(tx, status, f"HTTP {http_version}".encode())
        return self._intervention()

    def finish(self) -> list[Match]:
        """Run the logging phase, free the transaction, return the rules that matched."""
        if self._done:
            return []
        self._done = True
        if self._e.always_log_phase or self._e.has_messages(self._key):
            self._L.msc_process_logging(self._tx)
        self._L.msc_transaction_cleanup(self._tx)
        matches = []
        for text in self._e._take_messages(self._key):
            ids = _RULE_ID.findall(text)
            if ids:
                msg = _MSG.search(text)
                var = _VARIABLE.search(text) or _FOUND_WITHIN.search(text)
                sev = _SEVERITY.search(text)
                matches.append(
                    Match(
                        int(ids[0]),
                        msg.group(1) if msg else "",
                        var.group(1) if var else "",
                        _POINTS.get(sev.group(1), 0) if sev else 0,
                    )
                )
        return matches

    def __del__(self) -> None:
        if not self._done:
            try:
                self._L.msc_transaction_cleanup(self._tx)
                self._e._take_messages(self._key)
            except Exception:
                pass
