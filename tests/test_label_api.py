"""The labelling store and REST API on SQLite: accounts, roles, leases, overlap, all-or-nothing import, export."""

import json
import threading

import pytest
from fastapi.testclient import TestClient

from labeling_ui.api import create_app
from labeling_ui.auth import hash_password, verify_password
from labeling_ui.export import merge_rankings
from labeling_ui.store import Store
from rm.data import comparison_pairs


@pytest.fixture
def env(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    for name, role in (("alice", "annotator"), ("bob", "annotator"), ("carol", "annotator"), ("root", "admin")):
        store.add_user(name, role, hash_password(f"{name}-pw"))
    client = TestClient(create_app(store, known_tags={"math", "safety"}))
    tokens = {n: client.post("/api/login", json={"username": n, "password": f"{n}-pw"}).json()["token"]
              for n in ("alice", "bob", "carol", "root")}
    auth = lambda n: {"Authorization": f"Bearer {tokens[n]}"}
    return store, client, auth


def test_passwords_are_salted_hashes():
    h1, h2 = hash_password("secret"), hash_password("secret")
    assert h1 != h2 and "secret" not in h1 and verify_password("secret", h1) and not verify_password("nope", h1)


def test_login_and_roles(env):
    store, client, auth = env
    assert client.post("/api/login", json={"username": "alice", "password": "wrong"}).status_code == 401
    assert client.get("/api/tasks/next?project=p").status_code == 401
    items = [{"prompt": "q", "responses": ["a", "b"]}]
    for method, url, kwargs in (("post", "/api/projects/p/tasks", {"json": items}),
                                ("get", "/api/projects/p/export", {})):
        assert getattr(client, method)(url, headers=auth("alice"), **kwargs).status_code == 403


def test_import_is_all_or_nothing_and_names_every_bad_item(env):
    store, client, auth = env
    items = [{"prompt": "ok", "responses": ["a", "b"]}, {"prompt": "one", "responses": ["only"]},
             {"prompt": "tags", "responses": ["a", "b"], "tags": ["astrology"]}, "not an object"]
    out = client.post("/api/projects/p/tasks?overlap=2", json=items, headers=auth("root"))
    assert out.status_code == 400
    errors = out.json()["detail"]["errors"]
    assert [e.split(":")[0] for e in errors] == ["item 1", "item 2", "item 3"]
    assert store.counts()["tasks"] == 0


def test_annotate_overlap_and_export(env):
    store, client, auth = env
    items = [{"prompt": [{"role": "user", "content": f"q{i}"}], "responses": ["a", "b", "c"], "tags": ["math"]}
             for i in range(3)]
    assert client.post("/api/projects/p/tasks?overlap=2", json=items, headers=auth("root")).status_code == 201
    seen = {}
    for name, ranks in (("alice", [1, 2, 2]), ("bob", [1, 3, 2]), ("carol", [2, 1, 3])):
        got = []
        while True:
            r = client.get("/api/tasks/next?project=p", headers=auth(name))
            if r.status_code == 204:
                break
            task = r.json()
            got.append(task["id"])
            assert client.post(f"/api/tasks/{task['id']}/annotations", json={"ranks": ranks, "strength": 0.5},
                               headers=auth(name)).status_code == 201
        seen[name] = got
    assert len(seen["alice"]) == len(set(seen["alice"])) == 3
    assert sum(len(v) for v in seen.values()) == 6  # 3 items x overlap 2
    assert client.post(f"/api/tasks/{seen['alice'][0]}/annotations", json={"ranks": [1, 2, 3]},
                       headers=auth("alice")).status_code == 409  # never twice
    lines = client.get("/api/projects/p/export", headers=auth("root")).text.splitlines()
    records = [json.loads(l) for l in lines]
    assert len(records) == 3 and all(len(r["annotators"]) == 2 for r in records)
    pairs, ties = comparison_pairs(records[0], "export:1")  # the reward model reads the export as it is
    assert pairs and records[0]["tags"] == ["math"]


def test_wrong_number_of_ranks_is_refused(env):
    store, client, auth = env
    client.post("/api/projects/p/tasks", json=[{"prompt": "q", "responses": ["a", "b"]}], headers=auth("root"))
    task = client.get("/api/tasks/next?project=p", headers=auth("alice")).json()
    assert client.post(f"/api/tasks/{task['id']}/annotations", json={"ranks": [1, 2, 3]},
                       headers=auth("alice")).status_code == 422
    assert client.post(f"/api/tasks/{task['id']}/annotations", json={"skip": True},
                       headers=auth("alice")).status_code == 201


def test_concurrent_annotators_on_sqlite(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'load.db'}")
    users = [store.add_user(f"u{i}", "annotator", "x") for i in range(20)]
    store.import_tasks("p", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(150)], overlap=3)
    done: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(uid):
        while True:
            task = store.next_task("p", uid)
            if task is None:
                return
            store.submit(task.id, uid, ranks=[1, 2])
            with lock:
                done.append((task.id, uid))

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == len(set(done)) == 450  # every item reached its overlap, none twice per annotator
    per_task = {}
    for task_id, _ in done:
        per_task[task_id] = per_task.get(task_id, 0) + 1
    assert set(per_task.values()) == {3}
    assert store.counts()["annotations"] == 450


def test_merge_rules():
    assert merge_rankings([[1, 2, 3], [1, 3, 2], [2, 1, 3]], "majority") == [1, 2, 3]
    assert merge_rankings([[1, 2], [2, 1]], "majority") == [1, 1]  # a tie stays a tie
    # Condorcet cycle a>b (2:1), b>c (2:1), c>a (2:1): ranked pairs locks two and breaks the cycle
    cyc = [[1, 2, 3], [3, 1, 2], [2, 3, 1]]
    assert sorted(merge_rankings(cyc, "ranked_pairs")) == [1, 2, 3]


def test_label_cli_users_import_export(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    db = f"sqlite:///{tmp_path / 'cli.db'}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = lambda *a, stdin=None: subprocess.run([sys.executable, "-m", "align.cli", "label", *a], input=stdin,
                                                capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run("users", "add", "ann", "--role", "annotator", "--db", db, stdin="pw1\n").returncode == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "responses": ["a", "b"]}\n{oops\n{"prompt": "q", "responses": ["a"]}\n')
    out = run("import", "--project", "p", "--file", str(bad), "--db", db)
    assert out.returncode == 2 and "bad.jsonl:2: not valid JSON" in out.stderr and "bad.jsonl:3:" in out.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "q", "responses": ["a", "b"]}\n')
    assert run("import", "--project", "p", "--file", str(good), "--db", db).returncode == 0
    store = Store(db)
    user = store.user_by_name("ann")
    assert "pw1" not in user.password_hash and verify_password("pw1", user.password_hash)
    task = store.next_task("p", user.id)
    store.submit(task.id, user.id, ranks=[2, 1])
    assert run("export", "--project", "p", "--out", str(tmp_path / "out.jsonl"), "--db", db).returncode == 0
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["ranking"] == [2, 1] and record["responses"] == ["a", "b"]
