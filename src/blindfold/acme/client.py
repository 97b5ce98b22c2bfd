"""Obtain and renew certificates by ACME (RFC 8555), with the `acme` + `josepy` packages.

`AcmeManager` runs in the process that holds the keys (origin agent, key server): for each
managed certificate it waits until renewal is due (`acme.renewal`), orders a certificate for
a CSR made with the key that stays in this process, answers the challenges (tls-alpn-01 by
way of the challenge directory the origin agent answers from, or dns-01 through the
operator's hook), checks the chain against the key and the names, and only then replaces the
certificate file atomically and calls `on_installed` (the process reloads it). A failure keeps
the certificate in service, counts `blindfold_acme_renewal_failures_total`, logs one line and
retries with exponential backoff and jitter.

The `acme` client is synchronous (requests); each call runs in a worker thread with a
deadline so the event loop never blocks on the CA.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from blindfold.acme import certfiles
from blindfold.acme.challenge import (
    ChallengeDir,
    dns01_name,
    dns01_value,
    key_authorization,
    tls_alpn01_certificate,
    valid_hostname,
)
from blindfold.acme.dnshook import run_dns_hook
from blindfold.acme.renewal import (
    Backoff,
    RenewalWindow,
    parse_renewal_info,
    renewal_info_id,
    renewal_time,
    select_profile,
)
from blindfold.config.acme import AcmeConfig, AcmeOrderConfig
from blindfold.errors import BlindfoldError, ProtocolError, UpstreamError, VerificationError
from blindfold.obs.metrics import MetricSpec

WEEK_S = 7 * 86400.0

METRICS = (
    MetricSpec(
        "blindfold_acme_renewals_total",
        "counter",
        "Certificates obtained by ACME and installed, by hostname (the order's first name).",
        ("hostname",),
    ),
    MetricSpec(
        "blindfold_acme_renewal_failures_total",
        "counter",
        "ACME orders that failed (the certificate in service stays), by hostname and reason.",
        ("hostname", "reason"),
    ),
    MetricSpec(
        "blindfold_acme_next_renewal_timestamp_seconds",
        "gauge",
        "When the next ACME attempt for the hostname is due (POSIX seconds).",
        ("hostname",),
        merge="min",
    ),
)


class _EmptyResponse(challenges.ChallengeResponse):
    """RFC 8555 §7.5.1: the client answers a challenge with an empty JSON object."""

    typ = "blindfold-empty"

    def __bool__(self) -> bool:
        # the client sends an empty payload (POST-as-GET, which answers nothing) for a falsy
        # object, and a fieldless one has length 0
        return True


def _answer(acme: client.ClientV2, challb: messages.ChallengeBody) -> None:
    """Tell the CA the challenge is ready (RFC 8555 §7.5.1). The answer's body is not used;
    some CAs (pebble 2.4) send no `Link: rel="up"`, which `answer_challenge` insists on
    after the POST has succeeded."""
    try:
        acme.answer_challenge(challb, _EmptyResponse())
    except errors.ClientError as exc:
        if '"up" Link header missing' not in str(exc):
            raise


# the floor between two successful orders of one certificate (unless forced): the larger of
# these (attack review certs #4: a clock 4-6 days ahead made 12 orders in 15 s)
MIN_RENEWAL_GAP_S = 3600.0
MIN_RENEWAL_GAP_FRACTION = 0.1


@dataclass
class _State:
    order: AcmeOrderConfig
    next_at: float = 0.0
    attempt: int = 0
    renewals: int = 0
    # no new order before this (POSIX seconds) after a successful one unless forced: a clock
    # ahead or a renewal window in the past must not turn into back-to-back orders
    not_before: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)


class AcmeError(BlindfoldError):
    """One ACME attempt failed; `reason` is a stable token (metric label)."""

    def __init__(self, reason: str, detail: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s


def _order_name(o: AcmeOrderConfig, value: object, wildcard: object) -> str:
    """The hostname an authorisation is for, which must be one of the order's (a wildcard's
    base with wildcard=true) and a valid hostname: a CA that lies must not make the dns-01
    hook write another name (another zone, or bytes no hostname has) nor the challenge dir
    answer for one (attack review certs #6)."""
    base = value if isinstance(value, str) else ""
    name = "*." + base if wildcard else base
    if not valid_hostname(base) or name not in o.hostnames:
        raise AcmeError(
            "unexpected_identifier",
            f"the CA asks to validate {name[:80]!r}, not a hostname of the order",
        )
    return name


def _load_account_key(path: str) -> JWKEC:
    """The ACME account key (P-256, ES256), created with mode 0600 at the first start."""
    key = certfiles.load_or_create_key(path, "ec-p256")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise VerificationError(f"{path}: the ACME account key must be an ECDSA P-256 key")
    return JWKEC(key=key)


class AcmeManager:
    def __init__(
        self,
        cfg: AcmeConfig,
        log: Callable[..., None],
        on_installed: Callable[[AcmeOrderConfig], None],
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.log = log  # log(event, **fields)
        self.on_installed = on_installed
        self.rng = rng or random.Random()
        self.backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        self.states = [_State(o) for o in cfg.orders]
        self.challenges = ChallengeDir(cfg.challenge_dir) if cfg.challenge_dir else None
        self.wake = asyncio.Event()
        self._account: JWKEC | None = None
        self._client: client.ClientV2 | None = None
        self._forced_at = -math.inf
        self._forced: list[float] = []  # monotonic times of the accepted forced renewals
        self._account_uri = ""  # the last one logged (acme_account)

    # ------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Before the TLS server loads its certificates: a placeholder where none exists yet,
        and the account key."""
        for o in self.cfg.orders:
            if certfiles.ensure_placeholder(o.cert, o.key, o.hostnames, o.key_type):
                self.log("acme_placeholder", hostname=o.hostnames[0], cert=o.cert)
        self._account = _load_account_key(self.cfg.account_key)

    def force(self, now: float | None = None) -> bool:
        """Renew every certificate now (admin `POST /acme/renew`). At most once per
        retry_initial_s and forced_renewals_per_week in any 7 days: whoever reaches the admin
        listener must not be able to spend the CA's rate limits (Let's Encrypt: a few
        duplicate certificates a week). False: too soon, nothing done."""
        now = time.monotonic() if now is None else now
        self._forced = [t for t in self._forced if now - t < WEEK_S]
        if (
            now - self._forced_at < self.cfg.retry_initial_s
            or len(self._forced) >= self.cfg.forced_renewals_per_week
        ):
            return False
        self._forced_at = now
        self._forced.append(now)
        for st in self.states:
            st.next_at = st.not_before = 0.0
        self.wake.set()
        return True

    # ------------------------------------------------------------ metrics
    def snapshot(self) -> dict[str, list[list[Any]]]:
        return {
            "blindfold_acme_renewals_total": [
                [[st.order.hostnames[0]], st.renewals] for st in self.states
            ],
            "blindfold_acme_renewal_failures_total": [
                [[st.order.hostnames[0], reason], n]
                for st in self.states
                for reason, n in sorted(st.failures.items())
            ],
            "blindfold_acme_next_renewal_timestamp_seconds": [
                [[st.order.hostnames[0]], round(st.next_at, 3)] for st in self.states
            ],
        }

    # ------------------------------------------------------------ the loop
    async def run(self) -> None:
        if self._account is None:
            self.prepare()
        for st in self.states:
            st.next_at = await self._due(st)
        checked = time.monotonic()
        while True:
            now = time.time()
            for st in self.states:
                if now >= st.next_at:
                    await self._attempt(st)
            since = time.monotonic() - checked
            if since >= self.cfg.check_interval_s:
                # the CA's window may have moved, a file been replaced; only this often, so a
                # time drawn inside an ARI window is not drawn again before it comes
                checked = time.monotonic()
                for st in self.states:
                    if st.attempt == 0:
                        st.next_at = max(await self._due(st), st.not_before)
                continue
            now = time.time()
            wait = min(
                [st.next_at - now for st in self.states] + [self.cfg.check_interval_s - since]
            )
            self.wake.clear()
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
                except TimeoutError:
                    pass

    async def _attempt(self, st: _State) -> None:
        o = st.order
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.order_timeout_s):
                chain = await self._issue(o)
            key = certfiles.load_or_create_key(o.key, o.key_type)
            leaf = certfiles.check_chain(chain, key, o.hostnames, time.time())[0]
            certfiles.install_chain(o.cert, chain)
        except Exception as exc:  # whatever a CA answers, the loop goes on (and retries)
            reason = (
                exc.reason
                if isinstance(exc, AcmeError)
                else "bad_chain"
                if isinstance(exc, VerificationError)
                else "timeout"
                if isinstance(exc, TimeoutError)
                else "io_error"
                if isinstance(exc, OSError)
                else "unexpected_answer"  # e.g. a name from the CA that is not a hostname
            )
            retry_after = exc.retry_after_s if isinstance(exc, AcmeError) else 0.0
            # start over at the directory next time: the CA may have moved its endpoints or
            # forgotten the account (a restored CA, a test CA restarted)
            self._client = None
            st.attempt += 1
            st.failures[reason] = st.failures.get(reason, 0) + 1
            delay = self.backoff.delay(st.attempt, self.rng, retry_after)
            st.next_at = time.time() + delay
            self.log(
                "acme_renewal_failed",
                hostname=o.hostnames[0],
                reason=reason,
                error=str(exc)[:300],
                attempt=st.attempt,
                retry_in_s=round(delay, 1),
            )
            return
        st.attempt = 0
        st.renewals += 1
        try:
            self.on_installed(o)
        except BlindfoldError as exc:  # the reload failed: the process keeps the old one
            self.log("acme_reload_failed", hostname=o.hostnames[0], error=str(exc)[:300])
        lifetime = leaf.not_valid_after_utc.timestamp() - leaf.not_valid_before_utc.timestamp()
        st.not_before = time.time() + max(MIN_RENEWAL_GAP_S, MIN_RENEWAL_GAP_FRACTION * lifetime)
        st.next_at = max(await self._due(st), st.not_before)
        self.log(
            "acme_renewed",
            hostname=o.hostnames[0],
            names=list(o.hostnames),
            seconds=round(time.monotonic() - t0, 3),
            next_renewal=round(st.next_at),
        )

    async def _due(self, st: _State) -> float:
        """When `st`'s certificate should be renewed: now for a placeholder or unreadable
        file, else inside the ARI window when the CA offers one, else at the lifetime
        fraction."""
        o = st.order
        try:
            chain = certfiles.load_chain(Path(o.cert).read_bytes())
        except (OSError, VerificationError):
            return 0.0
        leaf = chain[0]
        if certfiles.is_placeholder(leaf):
            return 0.0
        start = leaf.not_valid_before_utc.timestamp()
        end = leaf.not_valid_after_utc.timestamp()
        window: RenewalWindow | None = None
        try:
            window = await self._renewal_window(leaf)
        except (AcmeError, ProtocolError) as exc:
            self.log("acme_renewal_info_failed", hostname=o.hostnames[0], error=str(exc)[:200])
        return renewal_time(start, end, self.cfg.renew_fraction, window, self.rng)

    # ------------------------------------------------------------ ACME, in threads
    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except errors.ValidationError as exc:
            details = "; ".join(
                str(a.body.challenges[0].error) if a.body.challenges else str(a.body.status)
                for a in exc.failed_authzrs
            )
            raise AcmeError("challenge_failed", details) from None
        except messages.Error as exc:
            raise AcmeError(f"ca_{exc.code or 'error'}", str(exc)[:300]) from None
        except errors.ConflictError:
            raise
        except errors.TimeoutError as exc:
            raise AcmeError("ca_timeout", str(exc)) from None
        except (errors.Error, OSError, ValueError) as exc:
            # requests' ConnectionError is an OSError; acme's ClientError and friends
            raise AcmeError("ca_unreachable", f"{type(exc).__name__}: {exc}"[:300]) from None

    async def _acme(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        if self._account is None:
            self._account = _load_account_key(self.cfg.account_key)
        net = client.ClientNetwork(
            self._account,
            alg=ES256,
            verify_ssl=self.cfg.ca_bundle or True,  # type: ignore[arg-type]  # requests' verify
            user_agent="blindfold-acme",
            timeout=int(self.cfg.request_timeout_s),
        )
        directory = await self._call(client.ClientV2.get_directory, self.cfg.directory, net)
        acme = client.ClientV2(directory, net)
        reg = messages.NewRegistration.from_data(
            email=",".join(c.removeprefix("mailto:") for c in self.cfg.contact) or None,
            terms_of_service_agreed=True,
        )
        try:
            regr = await self._call(acme.new_account, reg)
        except errors.ConflictError as exc:  # the key has an account already
            regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        net.account = regr
        self._client = acme
        if regr.uri and regr.uri != self._account_uri:
            # the operator pins issuance to this account with a CAA record (RFC 8657
            # accounturi=): a hostile edge that passes validation cannot get a certificate
            self._account_uri = regr.uri
            self.log(
                "acme_account",
                account_uri=regr.uri,
                directory=self.cfg.directory,
                caa=f'0 issue "<ca-domain>; accounturi={regr.uri}"',
            )
        return acme

    async def _renewal_window(self, leaf: x509.Certificate) -> RenewalWindow | None:
        acme = await self._acme()
        base = acme.directory.to_partial_json().get("renewalInfo")
        if not base:
            return None  # RFC 9773 §3: the CA offers no renewal information
        url = f"{str(base).rstrip('/')}/{renewal_info_id(leaf)}"
        resp = await self._call(acme.net.get, url, content_type="application/json")
        return parse_renewal_info(resp.content)

    async def _issue(self, o: AcmeOrderConfig) -> bytes:
        acme = await self._acme()
        assert self._account is not None
        meta = acme.directory.meta.to_partial_json() if acme.directory.meta else {}
        try:
            profile = select_profile(meta, self.cfg.profile)
        except ProtocolError as exc:
            raise AcmeError(exc.reason, exc.detail) from None
        key = certfiles.load_or_create_key(o.key, o.key_type)  # generated here, kept here
        csr = certfiles.make_csr(key, o.hostnames)
        orderr = await self._call(acme.new_order, csr, profile=profile)
        thumbprint = self._account.public_key().thumbprint()
        cleanups: list[Callable[[], Any]] = []
        try:
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue
                name = _order_name(o, authzr.body.identifier.value, authzr.body.wildcard)
                challb, key_auth = self._pick(authzr, thumbprint)
                await self._provision(o, name, key_auth, cleanups)
                await self._call(_answer, acme, challb)
            deadline = datetime.datetime.now() + datetime.timedelta(
                seconds=self.cfg.order_timeout_s
            )
            done = await self._call(acme.poll_and_finalize, orderr, deadline)
        finally:
            for undo in reversed(cleanups):
                try:
                    await undo()
                except (UpstreamError, OSError) as exc:
                    self.log("acme_cleanup_failed", hostname=o.hostnames[0], error=str(exc))
        chain = done.fullchain_pem
        return chain.encode() if isinstance(chain, str) else bytes(chain)

    def _pick(self, authzr: messages.AuthorizationResource, thumbprint: bytes) -> tuple[Any, str]:
        wanted = self.cfg.challenge
        if authzr.body.wildcard and wanted == "tls-alpn-01":
            raise AcmeError("wildcard_needs_dns01", authzr.body.identifier.value)
        for challb in authzr.body.challenges:
            jobj = challb.chall.to_partial_json()
            if jobj.get("type") == wanted and isinstance(jobj.get("token"), str):
                return challb, key_authorization(jobj["token"], thumbprint)
        raise AcmeError("challenge_unavailable", f"the CA offers no {wanted} challenge")

    async def _provision(
        self, o: AcmeOrderConfig, name: str, key_auth: str, cleanups: list[Callable[[], Any]]
    ) -> None:
        if self.cfg.challenge == "tls-alpn-01":
            store = self.challenges
            assert store is not None  # the config requires challenge_dir
            cert_pem, key_pem = tls_alpn01_certificate(name, key_auth)
            store.put(name, cert_pem, key_pem)

            async def remove() -> None:
                store.remove(name)

            cleanups.append(remove)
            return
        record, value = dns01_name(name), dns01_value(key_auth)
        hook, timeout = self.cfg.dns_hook, self.cfg.dns_hook_timeout_s
        try:
            await run_dns_hook(hook, "set", record, value, timeout)
        except UpstreamError as exc:
            raise AcmeError(exc.reason, exc.detail) from None

        async def clear() -> None:
            await run_dns_hook(hook, "clear", record, value, timeout)

        cleanups.append(clear)
