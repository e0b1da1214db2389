"""Services as separate processes, for the tests of whole deployments: started with real command lines, their
output in a file each, stopped at the end (SIGTERM side by side, SIGKILL after 10 s)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Process:
    """One service, started as `python ARGS`, its output in a file; `.line(prefix)` waits for a line."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    def line(self, marker: str, timeout: float = 30.0, anywhere: bool = False) -> str:
        """What follows `marker` on the first line that starts with it (or, `anywhere`, contains it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                at = line.find(marker) if anywhere else (0 if line.startswith(marker) else -1)
                if at >= 0:
                    return line[at + len(marker):].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.proc.args} did not print {marker!r}:\n{self.log.read_text()[-3000:]}")

    def exit_code(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait_or_kill(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._out.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """The processes a test starts; all terminated at the end."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.terminate()
    for process in started:
        process.wait_or_kill()
