"""Real servers for tests and benchmarks: `align label serve` in a subprocess, and a throwaway PostgreSQL cluster."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ALIGN = str(Path(sys.executable).parent / "align")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelServer:
    """`align label serve --db URL` on a free port; `kill()` sends SIGKILL, `start()` starts it again."""

    def __init__(self, db: str, log: Path, taxonomy: Path | None = None) -> None:
        self.db, self.log, self.taxonomy = db, log, taxonomy
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LabelServer":
        cmd = [ALIGN, "label", "serve", "--db", self.db, "--port", str(self.port)]
        if self.taxonomy:
            cmd += ["--taxonomy", str(self.taxonomy)]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.post(f"{self.url}/api/login", json={"username": "", "password": ""}, timeout=2).status_code:
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} was not found: install the server (apt-get install postgresql); "
                           ".ci/run does this")
    return found[-1]


class Postgres:
    """A PostgreSQL cluster in a temporary folder, run as the `postgres` user when we are root."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "pgdata"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *cmd: str) -> None:
        if self.as_root:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> str:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            os.chmod(self.dir.parent, 0o777)
            for parent in self.dir.parents:  # postgres must be able to reach its data folder
                if str(parent).startswith("/tmp/") and parent != Path("/tmp"):
                    os.chmod(parent, os.stat(parent).st_mode | 0o011)
        self._run(_pg_bin("initdb"), "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-l", str(self.dir / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
