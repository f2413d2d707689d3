"""A redis-server of the test's own on a free loopback port (Debian's binary), optionally persistent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from serving_support import free_port


class RedisServer:
    """`persistent`: append-only file fsynced on every write plus an RDB snapshot on shutdown, so a
    write the server acknowledged survives a restart (or a kill). Otherwise nothing touches disk."""

    def __init__(self, folder: Path, *, persistent: bool = False):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make test installs it: make system-deps)")
        self.folder, self.port = folder, free_port()
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", "3600 1"] if persistent
                       else ["--appendonly", "no", "--save", ""])  # fmt: skip
        self._command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), *persistence]
        self._process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        from turbo_serve.jobs.redis_store import RedisJobStore

        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = RedisJobStore(self.url)
        try:
            probe.ping(timeout_s=10.0)
        finally:
            probe.close()
        return self

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (redis saves and exits) or SIGKILL (no chance to save: only the fsynced log counts)."""
        if self._process is None:
            return
        self._process.kill() if kill else self._process.terminate()
        self._process.wait(timeout=10)
        self._process = None
