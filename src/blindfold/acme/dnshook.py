"""dns-01 through an operator's hook command (for wildcards and for hosts no CA can reach).

The hook is run as `CMD... set|clear NAME VALUE` (NAME: `_acme-challenge.<host>`, VALUE: the
TXT value of RFC 8555 §8.4), without a shell, with a deadline; a non-zero exit, a hook that
cannot start or one that outlives its deadline is an error naming the hook and its last
output line. The hook must return only once the record is served by the zone's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from blindfold.errors import UpstreamError

MAX_OUTPUT_BYTES = 65536


async def run_dns_hook(
    hook: Sequence[str], action: str, name: str, value: str, timeout_s: float
) -> None:
    """Run the hook once; UpstreamError(reason) on failure: dns_hook_failed (exit code),
    dns_hook_timeout, dns_hook_unavailable (cannot start)."""
    if action not in ("set", "clear"):
        raise ValueError(action)
    try:
        proc = await asyncio.create_subprocess_exec(
            *hook,
            action,
            name,
            value,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise UpstreamError("dns_hook_unavailable", f"{hook[0]}: {exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            assert proc.stdout is not None
            out = await proc.stdout.read(MAX_OUTPUT_BYTES)
            # drain the rest unread so a chatty hook cannot block on a full pipe
            while await proc.stdout.read(MAX_OUTPUT_BYTES):
                pass
            code = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise UpstreamError(
            "dns_hook_timeout", f"{hook[0]} {action} {name}: no exit within {timeout_s:g} s"
        ) from None
    if code != 0:
        lines = out.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1][:200] if lines else ""
        raise UpstreamError(
            "dns_hook_failed", f"{hook[0]} {action} {name}: exit code {code}: {last}"
        )
