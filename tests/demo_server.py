"""``visiontools demo`` in a subprocess on a free local port, for the browser and queue tests: start it,
wait until it answers, read its log, stop it. Also the headless Chromium the browser tests drive."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Runs `visiontools demo` with two test hooks. A Python audit hook logs every DNS lookup or connection
# to a host other than this machine ("NETWORK ACCESS ..."), so a test can check that nothing reaches
# for the internet. Each merge request is held $VT_HOLD_SECONDS (while the file $VT_HOLD_FILE exists,
# when that is set) and logs how many run at once ("ACTIVE n"), so a test can show users being served
# at the same time on any machine.
HOLDING_LAUNCHER = """
import functools, os, sys, threading, time
import visiontools.demos.merge_tab as merge_tab
_lock, _active, _merge = threading.Lock(), [0], merge_tab.run_merge
_seconds, _gate = float(os.environ.get("VT_HOLD_SECONDS", "0")), os.environ.get("VT_HOLD_FILE")

@functools.wraps(_merge)
def _held(*args, **kwargs):
    if not _seconds or (_gate and not os.path.exists(_gate)):
        return _merge(*args, **kwargs)
    with _lock:
        _active[0] += 1
        print(f"ACTIVE {_active[0]}", flush=True)
    try:
        time.sleep(_seconds)
        return _merge(*args, **kwargs)
    finally:
        with _lock:
            _active[0] -= 1

merge_tab.run_merge = _held
LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0", None)
def hook(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if isinstance(host, bytes):
        host = host.decode()
    if host not in LOCAL:
        print(f"NETWORK ACCESS: {event} {host}", file=sys.stderr, flush=True)
sys.addaudithook(hook)
from visiontools.cli import main
sys.exit(main(sys.argv[1:]))
"""


EXPECT_TIMEOUT_MS = 30_000  # a loaded 2-core machine can take seconds per model call; Playwright's default is 5 s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoServer:
    """``visiontools demo --port P --threads 1 *options`` run by ``launcher`` (Python source that ends by
    calling the CLI; None runs ``python -m visiontools.cli``), its output in ``log_path``. ``env`` is
    added to the environment after the names in ``drop_env`` are removed. Construction returns once
    the page answers HTTP 200, or fails the test with the server's log."""

    def __init__(self, log_path: Path, *options: str, launcher: str | None = None, env: dict | None = None,
                 drop_env: tuple[str, ...] = (), timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        full_env = {k: v for k, v in os.environ.items() if k not in drop_env}
        full_env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        entry = ["-c", launcher] if launcher is not None else ["-m", "visiontools.cli"]
        self.proc = subprocess.Popen([sys.executable, *entry, "demo", "--port", str(self.port), "--threads", "1",
                                      *options], cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while not self._answers():
            if self.proc.poll() is not None:
                self.close()
                pytest.fail(f"the demo exited with code {self.proc.returncode}:\n{self.log_path.read_text()}")
            if time.monotonic() - t0 > timeout:
                self.close()
                pytest.fail(f"the demo did not answer within {timeout:.0f} s:\n{self.log_path.read_text()}")
            time.sleep(0.3)
        self.startup_seconds = time.monotonic() - t0

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def output(self) -> str:
        """Everything the server has printed so far."""
        self.log.flush()
        return self.log_path.read_text()

    def close(self):
        """Stop the server (terminate, then kill after 10 s)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
