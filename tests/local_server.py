"""Servers on loopback ports for tests and benchmarks: a free port, a process started with its
output in a log file (never a pipe, which a chatty server can fill and block on), a wait until it
answers /v1/models, and a stop of its whole process group (a vLLM server has an engine child)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = log_path.open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Returns once `url`/models answers; raises with the log's tail if the server dies or is too slow."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process)
                raise RuntimeError(f"the server at {url} did not start: {log_path.read_text()[-2000:]}") from None
            time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
