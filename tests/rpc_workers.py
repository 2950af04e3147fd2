"""Real `moechat worker` subprocesses on free 127.0.0.1 ports, and a fake RPC server that
answers the hello with another protocol version (or hangs up), for the worker tests."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, threads: int = 1):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moechat", "worker", "--port", str(self.port), "--threads", str(threads)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:  # ready when the port accepts; the probe's own connection is served and closed
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.proc.stderr.read()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("worker did not start listening within 60 s")
            time.sleep(0.1)

    def stop(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@contextlib.contextmanager
def workers(n: int, threads: int = 1):
    started = []
    try:
        for _ in range(n):
            started.append(Worker(threads))
        yield started
    finally:
        for w in started:
            w.stop()


@contextlib.contextmanager
def fake_rpc_server(version: tuple[int, int, int] | None):
    """A one-thread TCP server: reads the hello and replies with `version` (None: hangs up
    after reading the command byte, as an older ggml does on a hello of another size)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1 + 8)
                if version is not None:
                    conn.recv(24)
                    conn.sendall(struct.pack("<Q", 28) + bytes(version) + bytes(25))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        server.close()
