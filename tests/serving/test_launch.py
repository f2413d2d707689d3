"""`turbo-serve serve` (what `make serve` runs) from a bare folder: it starts its own Ray, prints
the URL, serves a job, and stops cleanly on Ctrl-C."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving_support import free_port

pytestmark = pytest.mark.ray


def test_turbo_serve_serve_prints_the_url_and_serves(tmp_path):
    port = free_port()
    command = [str(Path(sys.executable).with_name("turbo-serve")), "serve", "--port", str(port), "--num-cpus", "2",
               "--metrics-export-port", str(free_port()), "--set", "gpu_exporter_port=0"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while not any("turbo-serve is up" in line for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines[-40:])
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines[-40:])
        assert f"http://127.0.0.1:{port}/" in lines[-1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            assert http.get("/").status_code == 200
            video = http.post("/v1/videos/sync", json={"prompt": "hello", "size": "128x128", "num_frames": 5, "num_steps": 1})
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        assert (tmp_path / "outputs" / "jobs.sqlite3").exists()  # embedded defaults: storage under the cwd
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0
