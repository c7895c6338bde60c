"""A real `entmtp serve` process on loopback with the real default model, one per test session.

The server's output goes to a log file (a pipe nobody reads would fill up and stall it); the
log's tail is printed when a server fails to start or to exit cleanly.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
MAX_RUNNING, MAX_WAITING = 8, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, log_path: Path, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
        cmd = [PYTHON, "-m", "srt_entmtp.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-running-requests", str(MAX_RUNNING), "--max-waiting-requests", str(MAX_WAITING),
               "--device", "cpu", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.model: str | None = None
        self.max_running, self.max_waiting = MAX_RUNNING, MAX_WAITING

    def log(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    def wait_healthy(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    self.model = httpx.get(self.base + "/v1/models", timeout=5).json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.proc.kill()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float = 90.0) -> int:
        """SIGTERM, then wait for the exit code (kills and fails after timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit within {timeout}s of SIGTERM:\n{self.log()}")
        finally:
            self._log.close()
        return rc

    def metrics(self) -> dict[str, float]:
        """Parse /metrics into {'name{labels}': value}."""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                m = re.match(r"^(\S+)\s+(\S+)$", line)
                if m:
                    out[m.group(1)] = float(m.group(2))
        return out


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_healthy()
    except Exception:
        if srv.proc.poll() is None:
            srv.proc.kill()
        raise
    yield srv
    rc = srv.terminate()
    assert rc == 0, f"server exited with {rc} after SIGTERM:\n{srv.log()}"
    assert "Traceback" not in srv.log(tail=100000), f"the server logged a traceback:\n{srv.log(200)}"


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base, timeout=120) as c:
        yield c


@pytest.fixture
def start_server(tmp_path):
    """Start an extra server (for tests that stop it); killed at the end if the test left it running."""
    started: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"server{len(started)}.log", *extra)
        started.append(srv)
        srv.wait_healthy()
        return srv

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
