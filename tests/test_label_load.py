"""Load on the real server (`align label serve`): 20 annotators submit 1,000 annotations concurrently through the REST
API, on SQLite and on a real PostgreSQL; a SIGKILL in the middle of the load loses no acknowledged annotation."""

import random
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from align.bench_label import LabelServer, Postgres
from labeling_ui.auth import hash_password
from labeling_ui.schema import Annotation, Lease, Task, User
from labeling_ui.store import Store

ANNOTATORS, ITEMS, OVERLAP, K = 20, 500, 2, 3  # 500 items x overlap 2 = 1,000 annotations


def setup_project(db: str) -> Store:
    store = Store(db)
    store.add_user("admin", "admin", hash_password("admin-pw"))
    for i in range(ANNOTATORS):
        store.add_user(f"a{i}", "annotator", hash_password(f"pw-{i}"))
    items = [
        {"prompt": f"question {i}", "responses": [f"r{i}-{j}" for j in range(K)], "tags": ["math"]}
        for i in range(ITEMS)
    ]
    store.import_tasks("load", items, OVERLAP)
    store.add_members("load", [f"a{i}" for i in range(ANNOTATORS)])
    return store


class Annotator(threading.Thread):
    """Takes tasks and ranks them until none is left or the server goes away; remembers what was acknowledged."""

    def __init__(self, url: str, i: int, stop_after: threading.Event | None = None) -> None:
        super().__init__()
        self.url, self.i, self.stop = url, i, stop_after
        self.acked: dict[int, list[int]] = {}
        self.sent: dict[int, list[int]] = {}  # including a request whose answer the kill swallowed
        self.seen: list[int] = []
        self.errors: list[str] = []
        self.rng = random.Random(i)

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=60) as http:
                token = http.post("/api/login", json={"username": f"a{self.i}", "password": f"pw-{self.i}"}).json()
                headers = {"Authorization": f"Bearer {token['token']}"}
                while not (self.stop and self.stop.is_set()):
                    r = http.get("/api/tasks/next", params={"project": "load"}, headers=headers)
                    if r.status_code == 204:
                        return
                    if r.status_code != 200:
                        self.errors.append(f"next: {r.status_code} {r.text[:200]}")
                        return
                    task = r.json()
                    if task["id"] not in self.seen:
                        self.seen.append(task["id"])
                    ranks = self.rng.sample(range(1, K + 1), K)
                    self.sent[task["id"]] = ranks
                    r = http.post(f"/api/tasks/{task['id']}/annotations", json={"ranks": ranks}, headers=headers)
                    if r.status_code != 201:
                        self.errors.append(f"annotate {task['id']}: {r.status_code} {r.text[:200]}")
                        return
                    self.acked[task["id"]] = ranks
        except httpx.TransportError:
            pass  # the server was killed; what was acknowledged before is in self.acked


def check_store(store: Store, annotators: list[Annotator], complete: bool, in_flight: int = 0) -> None:
    """`in_flight`: how many submissions may have been committed without their acknowledgement reaching the
    client (requests cut off by a kill); each must still be exactly what its annotator sent."""
    with store.sessions() as s:
        rows = s.execute(select(Annotation, User.name).join(User, User.id == Annotation.user_id)).all()
        overlaps = dict(s.execute(select(Task.id, Task.overlap)).all())
    stored = {(name, a.task_id): a.ranks for a, name in rows}
    assert len(stored) == len(rows)  # no annotator holds two annotations of one item
    for ann in annotators:  # every acknowledged submission is stored, exactly as sent
        for task_id, ranks in ann.acked.items():
            assert stored[(f"a{ann.i}", task_id)] == ranks
    unacked = [(name, t) for (name, t) in stored if t not in annotators[int(name[1:])].acked]
    assert len(unacked) <= in_flight  # nothing stored that was not sent and cut off…
    for name, t in unacked:
        assert stored[(name, t)] == annotators[int(name[1:])].sent[t]
    for a, _ in rows:  # …and nothing half-written
        assert a.ranks is not None and len(a.ranks) == K and a.created is not None
    per_task: dict[int, int] = {}
    for a, _ in rows:
        per_task[a.task_id] = per_task.get(a.task_id, 0) + 1
    assert max(per_task.values()) <= OVERLAP and all(per_task[t] <= overlaps[t] for t in per_task)
    for ann in annotators:
        assert len(ann.seen) == len(set(ann.seen))
    if complete:
        assert len(rows) == ITEMS * OVERLAP


def run_load(url: str, n: int = ANNOTATORS) -> list[Annotator]:
    threads = [Annotator(url, i) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in threads:
        assert not t.errors, t.errors
    return threads


@pytest.mark.slow
def test_twenty_annotators_thousand_annotations_on_postgresql(tmp_path):
    """(On SQLite, the same load runs in the SIGKILL test below, finished after a restart.)"""
    pg = Postgres(tmp_path)
    db = pg.start()
    try:
        store = setup_project(db)
        server = LabelServer(db, tmp_path / "server.log").start()
        try:
            annotators = run_load(server.url)
        finally:
            server.stop()
        check_store(store, annotators, complete=True)
        log = (tmp_path / "server.log").read_text()
        assert "pw-1" not in log and "admin-pw" not in log  # passwords never logged
        store.engine.dispose()
    finally:
        pg.stop()


@pytest.mark.slow
def test_sqlite_load_with_a_sigkill_in_the_middle_loses_nothing_acknowledged(tmp_path):
    """20 annotators submit 1,000 annotations on SQLite; the server is SIGKILLed after 300, restarted, and the
    same annotators finish: every acknowledged annotation is there exactly once, nothing half-written."""
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    store = setup_project(db)
    server = LabelServer(db, tmp_path / "server.log").start()
    annotators = [Annotator(server.url, i) for i in range(ANNOTATORS)]
    for t in annotators:
        t.start()
    deadline = time.time() + 120
    while sum(len(a.acked) for a in annotators) < 300 and time.time() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while 20 annotators are mid-request
    for t in annotators:
        t.join()
    acked = sum(len(a.acked) for a in annotators)
    assert 300 <= acked < ITEMS * OVERLAP
    check_store(store, annotators, complete=False, in_flight=ANNOTATORS)
    with store.sessions() as s:
        assert s.execute(select(Lease)).first() is not None  # leases of the interrupted requests survive
    assert store.engine.connect().exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    server.start()  # restarted, the same annotators finish the project
    resumed = [Annotator(server.url, i) for i in range(ANNOTATORS)]
    for old, new in zip(annotators, resumed):
        new.acked, new.seen, new.sent = dict(old.acked), list(old.seen), dict(old.sent)
    for t in resumed:
        t.start()
    for t in resumed:
        t.join()
    server.stop()
    assert all(not t.errors for t in resumed), [t.errors for t in resumed]
    check_store(store, resumed, complete=True, in_flight=ANNOTATORS)
