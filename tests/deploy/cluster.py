"""A small cluster on this machine for the scale-out tests: `linmod-serve` replicas as separate
processes on fixed ports (so a restarted one comes back where the load balancer expects it),
Debian's HAProxy running the shipped deploy/haproxy/haproxy.cfg, and a reader of its log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_testing import free_port, log_tail, wait_server_ready

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"


def serve_command() -> list[str]:
    """The installed `linmod-serve` beside this Python, else the module it runs."""
    script = Path(sys.executable).with_name("linmod-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


class Replica:
    """One `linmod-serve` process on a fixed port; started again on the same port."""

    def __init__(
        self, name: str, artifact: Path, database_url: str, logs: Path, *flags: str
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = logs
        self.starts = 0
        self.command = [
            *serve_command(), "--model-dir", str(artifact), "--host", "127.0.0.1",
            "--port", str(self.port), "--device", "cpu", "--precision", "fp32",
            "--intra-op-threads", "1", "--log-format", "json", "--database-url", database_url,
            *flags,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.logs / f"{self.name}-{self.starts}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the process (not waiting for it: see `wait_ready`)."""
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    def wait_ready(self, timeout: float = 120) -> None:
        assert self.proc is not None
        wait_server_ready(self.proc, self.url, self.log, timeout)

    def kill(self) -> None:
        """SIGKILL: nothing drains, nothing is handed back."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process runs nothing and writes nothing until `resume`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 60) -> tuple[int | None, float]:
        """SIGTERM, as a rolling update sends it; the exit status and seconds until exit, or
        None if it had not exited after `timeout` s (then it is killed, as Kubernetes would)."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        return code, time.monotonic() - began

    def stop(self) -> None:
        """Stop whatever is still running (test teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def haproxy_config(replicas: list[Replica], port: int, stats_port: int) -> str:
    """The shipped configuration with this machine's addresses: the replicas' fixed ports for
    the DNS-discovered compose service, loopback binds, and the client's X-Request-ID in each
    log line (to tell which replica served which request)."""
    text = HAPROXY_CFG.read_text()
    servers = "".join(f"    server {r.name} 127.0.0.1:{r.port}\n" for r in replicas)
    edits = [
        (r"\nresolvers docker\n(?:[ \t]+.*\n)+", "\n"),
        (r"(?m)^    server-template .*\n", servers),
        (r"(?m)^    bind :8000$", f"    bind 127.0.0.1:{port}\n"
                                  "    capture request header X-Request-ID len 40"),
        (r"(?m)^    bind :8404$", f"    bind 127.0.0.1:{stats_port}"),
    ]  # fmt: skip
    for pattern, replacement in edits:
        text, n = re.subn(pattern, replacement, text)
        assert n == 1, f"{HAPROXY_CFG} no longer has one match of {pattern!r}"
    return text


class LoadBalancer:
    """HAProxy in the foreground, its log (one line per request) in a file."""

    def __init__(self, replicas: list[Replica], workdir: Path) -> None:
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(replicas, self.port, self.stats_port))
        self.log = workdir / "haproxy.log"
        checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [haproxy, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"HAProxy never answered:\n{log_tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def requests(self) -> dict[str, LoggedRequest]:
        """The logged requests that carried an X-Request-ID, by that id."""
        found = {}
        for line in self.log.read_text(errors="replace").splitlines():
            logged = LoggedRequest.parse(line)
            if logged is not None and logged.request_id:
                found[logged.request_id] = logged
        return found


# HAProxy's httplog format: ... backend/server Tq/Tw/Tc/Tr/Ta status bytes cookies cookies
# termination actconn/feconn/beconn/srv_conn/retries srv_queue/backend_queue {captured} "request"
HTTPLOG = re.compile(
    r" (?P<backend>[\w-]+)/(?P<server><NOSRV>|[\w-]+) (?P<timers>\S+) (?P<status>-?\d+) \S+ \S+ \S+ "
    r"(?P<termination>\S{4}) (?P<conns>\S+) \S+ \{(?P<request_id>[^}]*)\} \"(?P<request>[^\"]*)\""
)


@dataclass(frozen=True)
class LoggedRequest:
    """One request as HAProxy logged it."""

    server: str  # the replica that answered last (after retries), or <NOSRV>
    status: int
    retries: int  # connection or L7 retries HAProxy made
    redispatched: bool  # a retry went to another replica
    termination: str  # two letters of why the session ended, '--' when it ended normally
    request_id: str
    request: str

    @classmethod
    def parse(cls, line: str) -> LoggedRequest | None:
        m = HTTPLOG.search(line)
        if m is None:
            return None
        retries = m["conns"].split("/")[-1]
        return cls(
            server=m["server"],
            status=int(m["status"]),
            retries=int(retries.lstrip("+")),
            redispatched=retries.startswith("+"),
            termination=m["termination"][:2],
            request_id=m["request_id"],
            request=m["request"],
        )
