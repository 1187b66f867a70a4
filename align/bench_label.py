"""`align bench label`: the labelling API of a real server under simulated annotators, and the launchers it
(and the labelling tests) start servers with: `align label serve` in a process of its own, a PostgreSQL server.
"""

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

from align.bench import row

ALIGN = str(Path(sys.executable).parent / "align")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelServer:
    """`align label serve --db URL` on a free port; `kill()` sends SIGKILL, `start()` starts it again."""

    def __init__(self, db: str, log: Path, taxonomy: Path | None = None, extra: tuple[str, ...] = ()) -> None:
        self.db, self.log, self.taxonomy, self.extra = db, log, taxonomy, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LabelServer":
        cmd = [ALIGN, "label", "serve", "--db", self.db, "--port", str(self.port)]
        if self.taxonomy:
            cmd += ["--taxonomy", str(self.taxonomy)]
        cmd += list(self.extra)
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
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or (
        [shutil.which(name)] if shutil.which(name) else []
    )
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} was not found: install the server (apt-get install postgresql); .ci/run does this"
        )
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
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.dir),
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200",
            "start",
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass


def label(
    annotators: tuple[int, ...] = (20, 50),
    per_annotator: int = 30,
    think: tuple[float, float] = (0.2, 0.8),
    backends: tuple[str, ...] = ("sqlite", "postgresql"),
) -> list[dict]:
    """The labelling API of a real server (`align label serve`) under N concurrent simulated annotators, on SQLite
    and on a PostgreSQL server started here: annotations/s, p50/p99 request latency, errors. Each annotator waits
    `think` seconds (uniform) before each request — far quicker than a person, who takes several seconds a ranking."""
    import random
    import tempfile
    import threading

    from labeling_ui.auth import hash_password
    from labeling_ui.store import Store

    out = []
    for backend in backends:
        for n in annotators:
            with tempfile.TemporaryDirectory() as tmp:
                pg = Postgres(Path(tmp)) if backend == "postgresql" else None
                db = pg.start() if pg else f"sqlite:///{tmp}/labels.db"
                try:
                    store = Store(db)
                    hashed = hash_password("pw")  # one hash for all: scrypt per user is not what is measured
                    for i in range(n):
                        store.add_user(f"a{i}", "annotator", hashed)
                    store.import_tasks(
                        "bench",
                        [{"prompt": f"q{i}", "responses": ["a", "b", "c"]} for i in range(n * per_annotator)],
                        1,
                    )
                    store.add_members("bench", [f"a{i}" for i in range(n)])
                    store.engine.dispose()
                    server = LabelServer(db, Path(tmp) / "server.log").start()
                    latencies: list[float] = []
                    errors: list[str] = []
                    done = [0]
                    lock = threading.Lock()

                    with httpx.Client(base_url=server.url, timeout=30) as http:  # logins (scrypt) before the clock
                        tokens = [
                            http.post("/api/login", json={"username": f"a{i}", "password": "pw"}).json()["token"]
                            for i in range(n)
                        ]

                    def annotator(i: int) -> None:
                        rng = random.Random(i)
                        h = {"Authorization": "Bearer " + tokens[i]}
                        with httpx.Client(base_url=server.url, timeout=30) as http:
                            for _ in range(per_annotator):
                                time.sleep(rng.uniform(*think))
                                t0 = time.perf_counter()
                                r = http.get("/api/tasks/next", params={"project": "bench"}, headers=h)
                                t1 = time.perf_counter()
                                if r.status_code != 200:
                                    errors.append(f"next {r.status_code}")
                                    return
                                time.sleep(rng.uniform(*think))
                                t2 = time.perf_counter()
                                r = http.post(
                                    f"/api/tasks/{r.json()['id']}/annotations",
                                    json={"ranks": rng.sample([1, 2, 3], 3)},
                                    headers=h,
                                )
                                t3 = time.perf_counter()
                                with lock:
                                    latencies.extend([t1 - t0, t3 - t2])
                                    if r.status_code != 201:
                                        errors.append(f"annotate {r.status_code}")
                                    else:
                                        done[0] += 1

                    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(n)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    seconds = time.perf_counter() - t0
                    server.stop()
                finally:
                    if pg:
                        pg.stop()
            lat = sorted(latencies)
            q = lambda f: lat[min(int(f * len(lat)), len(lat) - 1)] * 1000 if lat else float("nan")
            tag = f"{backend}_{n}"
            out += [
                row("label", f"annotations_per_s_{tag}", done[0] / seconds, None, "annotations/s"),
                row("label", f"p50_ms_{tag}", q(0.5), None, "ms"),
                row("label", f"p99_ms_{tag}", q(0.99), None, "ms"),
                row("label", f"errors_{tag}", float(len(errors)), None, "count"),
            ]
    return out
