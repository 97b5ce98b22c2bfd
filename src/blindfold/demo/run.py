"""Start a demo origin and an edge on loopback, print what to run, serve until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import sys
import tempfile
from pathlib import Path

from blindfold import pki
from blindfold.demo.origin import DemoOrigin

HOST = "demo.blindfold.test"


def _edge_config(listen: str, admin: str, origin_port: int) -> str:
    return f"""\
# blindfold demo: an edge in passthrough mode in front of a demo origin.
[edge]
listen = ["{listen}"]
admin_listen = "{admin}"
workers = 2

[[edge.routes]]
name = "demo"
sni = ["{HOST}", "*.{HOST}"]
mode = "passthrough"
origins = ["127.0.0.1:{origin_port}"]
proxy_protocol = "v2"
"""


async def _wait_ready(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("the edge exited during start-up")
            text = line.decode(errors="replace")
            if '"event":"edge_ready"' in text:
                return text


async def _pump(stream: asyncio.StreamReader | None, path: Path) -> None:
    if stream is None:
        return
    with path.open("ab") as fh:
        while line := await stream.readline():
            fh.write(line)
            fh.flush()


async def demo(port: int, admin_port: int, workdir: str | None, duration: float | None,
               self_check: bool) -> int:
    base = Path(workdir or tempfile.mkdtemp(prefix="blindfold-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("blindfold demo CA")
    ca.write(base / "ca.pem")
    site = pki.issue(ca, [HOST, f"*.{HOST}"])
    site.write(base / "site.pem", base / "site.key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(base / "site.pem", base / "site.key")
    ctx.set_alpn_protocols(["http/1.1"])
    origin = DemoOrigin(ctx, expect_proxy=True)
    origin_port = await origin.start()
    conf = base / "edge.toml"
    conf.write_text(_edge_config(f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}", origin_port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blindfold", "edge", "--config", str(conf),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        try:
            await _wait_ready(proc, 20)
        except (RuntimeError, TimeoutError):
            err = (await proc.stderr.read()).decode() if proc.stderr else ""
            print(f"blindfold demo: the edge did not start:\n{err}", file=sys.stderr)
            return 1
        log_path = base / "edge.log"
        pumps = [asyncio.create_task(_pump(proc.stdout, log_path)),
                 asyncio.create_task(_pump(proc.stderr, log_path))]
        curl = (f"curl --cacert {base / 'ca.pem'} --resolve {HOST}:{port}:127.0.0.1 "
                f"https://{HOST}:{port}/")
        print(f"""
blindfold demo is running (files in {base})

  visitor --TLS--> edge 127.0.0.1:{port} (passthrough: forwards the encrypted bytes)
                   --PROXY v2 + TLS--> origin 127.0.0.1:{origin_port} (holds the key)

Fetch the page through the edge; the certificate is the origin's, issued by the demo CA:
  {curl}

See the certificate the edge passes through (it never had the key):
  openssl s_client -connect 127.0.0.1:{port} -servername {HOST} -CAfile {base / 'ca.pem'} </dev/null

An unknown name is refused by the edge:
  curl -k --resolve other.test:{port}:127.0.0.1 https://other.test:{port}/

Metrics and health:   curl http://127.0.0.1:{admin_port}/metrics   curl http://127.0.0.1:{admin_port}/healthz
Edge logs (JSON):     {log_path}
Stop with Ctrl-C.
""", flush=True)
        if self_check:
            ok = await _self_check(curl, admin_port)
            if not ok:
                return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
        for task in pumps:
            task.cancel()
        return 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 40)
            except TimeoutError:
                proc.kill()
        await origin.close()
        if workdir is None and not os.environ.get("BLINDFOLD_DEMO_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


async def _self_check(curl: str, admin_port: int) -> bool:
    proc = await asyncio.create_subprocess_shell(
        curl + " -sS --max-time 10", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    page = out.decode(errors="replace")
    ok = proc.returncode == 0 and "Hello from the origin" in page and "127.0.0.1" in page
    print(f"self-check: curl through the edge {'OK' if ok else 'FAILED'}", flush=True)
    if not ok:
        print(err.decode(errors="replace"), file=sys.stderr)
    return ok


def run_demo(port: int, admin_port: int, workdir: str | None, duration: float | None,
             self_check: bool) -> int:
    return asyncio.run(demo(port, admin_port, workdir, duration, self_check))
