"""A real `moechat serve` in a subprocess on a free loopback port, for the real clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

API_KEY = "test-key-15"
ORIGIN = "http://tool.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moechat", "serve", *args, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, **(env or {})})
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout_lines, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines, False), daemon=True).start()

    def _pump(self, stream, lines: list, watch: bool) -> None:
        for line in stream:
            lines.append(line)
            if watch and "listening on" in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 240) -> "Server":
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"moechat serve did not start: {''.join(self.stderr_lines)}")
        return self

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C, as a user would; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)
