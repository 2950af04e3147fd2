"""llama.cpp's own log lines go to a file in the user state dir, not to the user's terminal.

llama-cpp-python installs a log callback that prints ERROR-level lines to stderr even with
`verbose=False`, and some warnings (`llama_context: n_ctx_seq (8192) > n_ctx_train (4096)`)
slip through while a context is created. Ours appends every line to `llama.cpp.log` in
`paths.state_dir()` and keeps the last error line, so a failure still reaches the user as one
line of moechat's (`last_error()`), never as llama.cpp's multi-line dump.

Why by hand: the library offers only the raw `llama_log_set` hook.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

LOG_NAME = "llama.cpp.log"
GGML_LOG_LEVEL_ERROR = 3
GGML_LOG_LEVEL_CONT = 5
MAX_LOG_BYTES = 4 * 1024**2  # started afresh past this (one run's log is a few KiB)


class _LlamaLog:
    """The installed callback and its file; one per process (llama.cpp's hook is global)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.file = None
        self.callback = None  # the ctypes function object must outlive its use by C
        self.last_error = ""
        self.echo = False  # also to stderr (an engine opened with verbose=True)
        self._last_level = 0

    def install(self, echo: bool = False) -> Path:
        import llama_cpp

        from moechat.backends.paths import state_dir

        with self.lock:
            self.echo = echo
            if self.callback is not None:
                return self.path
            self.path = state_dir() / LOG_NAME
            if self.path.exists() and self.path.stat().st_size > MAX_LOG_BYTES:
                self.path.unlink()
            self.file = open(self.path, "a", encoding="utf-8", errors="replace")
            self.callback = llama_cpp.llama_log_callback(self._write)
            llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))
            return self.path

    def _write(self, level: int, text: bytes, user_data) -> None:
        line = text.decode("utf-8", "replace")
        level = self._last_level if level == GGML_LOG_LEVEL_CONT else level
        self._last_level = level
        with self.lock:
            self.file.write(line)
            self.file.flush()
            if self.echo:
                sys.stderr.write(line)
            if level == GGML_LOG_LEVEL_ERROR and line.strip():
                self.last_error = line.strip()


_LOG = _LlamaLog()


def install_log(echo: bool = False) -> Path:
    """Route llama.cpp's log to the state dir's file (idempotent; echo: to stderr as well, for
    verbose engines); returns the file's path."""
    return _LOG.install(echo)


def last_error() -> str:
    """The last ERROR-level line llama.cpp logged ("" if none)."""
    return _LOG.last_error
