"""The labelling server against what an outsider or a role could try: account life cycle, sessions, throttled and
constant-work logins, skips, strict input (422/413, never 500) on SQLite and PostgreSQL, no stalls behind writes."""

import json
import sqlite3
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.bench_label import LabelServer, Postgres
from labeling_ui.api import create_app
from labeling_ui.auth import LoginThrottle, hash_password
from labeling_ui.store import Store

USERS = (("alice", "annotator"), ("bob", "annotator"), ("rita", "reviewer"), ("root", "admin"))


def make_env(url: str, throttle: LoginThrottle | None = None, **app_kwargs):
    store = Store(url)
    for name, role in USERS:
        store.add_user(name, role, hash_password(f"{name}-pw"))
    for project in ("p", "f"):
        store.add_members(project, ["alice", "bob", "rita"])
    client = TestClient(create_app(store, known_tags=None, throttle=throttle, **app_kwargs))
    return store, client


def login(client, name, password=None):
    r = client.post("/api/login", json={"username": name, "password": password or f"{name}-pw"})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.fixture
def env(tmp_path):
    store, client = make_env(f"sqlite:///{tmp_path / 'labels.db'}")
    client.post(
        "/api/projects/p/tasks",
        json=[{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(3)],
        headers=login(client, "root"),
    )
    return store, client


def test_removed_disabled_or_demoted_users_lose_access_at_once_and_ids_are_not_reused(env, tmp_path):
    store, client = env
    alice, root = login(client, "alice"), login(client, "root")
    assert client.get("/api/tasks/next?project=p", headers=alice).status_code == 200
    other = Store(store.url)  # another process's view of the same database (the CLI)
    other.remove_user("alice")
    assert client.get("/api/tasks/next?project=p", headers=alice).status_code == 401
    assert client.post("/api/login", json={"username": "alice", "password": "alice-pw"}).status_code == 401
    new_id = other.add_user("alice", "admin", hash_password("new"))
    assert new_id not in {u["id"] for u in other.users() if u["name"] != "alice"} and new_id > len(USERS)
    assert client.get("/api/tasks/next?project=p", headers=alice).status_code == 401  # no token of the old alice
    other.set_role("root", "annotator")
    assert client.get("/api/projects/p/agreement", headers=root).status_code == 401  # sessions ended on a change
    assert client.get("/api/projects/p/agreement", headers=login(client, "root")).status_code == 403
    bob = login(client, "bob")
    other.set_disabled("bob", True)
    assert client.get("/api/projects/p/progress", headers=bob).status_code == 401
    assert client.post("/api/login", json={"username": "bob", "password": "bob-pw"}).status_code == 401
    other.set_disabled("bob", False)
    assert client.get("/api/projects/p/progress", headers=login(client, "bob")).status_code == 200


def test_annotators_and_reviewers_see_only_their_projects(env):
    store, client = env
    root = login(client, "root")
    items = [{"prompt": "secret", "responses": ["a", "b"]}]
    assert client.post("/api/projects/other/tasks", json=items, headers=root).status_code == 201
    alice, rita = login(client, "alice"), login(client, "rita")
    assert client.get("/api/tasks/next?project=other", headers=alice).status_code == 404
    assert client.get("/api/projects/other/progress", headers=alice).status_code == 404
    assert client.get("/api/projects/other/agreement", headers=rita).status_code == 404
    assert client.get("/api/projects/other/export", headers=rita).status_code == 404
    assert store.projects(store.user_by_name("alice")) == ["p", "f"]
    r = client.post("/api/projects/other/members", json={"users": ["alice", "rita"]}, headers=root)
    assert r.status_code == 201 and r.json()["members"] == ["alice", "rita"]
    assert client.post("/api/projects/other/members", json={"users": ["ghost"]}, headers=root).status_code == 404
    assert client.post("/api/projects/other/members", json={"users": ["bob"]}, headers=alice).status_code == 403
    assert client.get("/api/tasks/next?project=other", headers=alice).json()["prompt"][0]["content"] == "secret"
    assert client.get("/api/projects/other/agreement", headers=rita).status_code == 200
    assert client.delete("/api/projects/other/members/alice", headers=root).status_code == 200
    assert client.get("/api/tasks/next?project=other", headers=alice).status_code == 404
    assert client.get("/api/projects/other/members", headers=root).json()["members"] == ["rita"]


def test_tokens_are_hashed_expire_and_end_at_logout(env, tmp_path):
    store, client = env
    headers = login(client, "alice")
    token = headers["Authorization"].split()[1]
    dump = "\n".join(sqlite3.connect(tmp_path / "labels.db").iterdump())
    assert token not in dump  # only its SHA-256 is stored
    with sqlite3.connect(tmp_path / "labels.db") as con:
        con.execute("UPDATE sessions SET expires = '2000-01-01 00:00:00'")
    assert client.get("/api/projects/p/progress", headers=headers).status_code == 401
    headers = login(client, "alice")
    assert client.post("/api/logout", headers=headers).status_code == 200
    assert client.get("/api/projects/p/progress", headers=headers).status_code == 401


def test_failed_logins_back_off_with_429_and_the_right_password_works_after(tmp_path):
    store, client = make_env(f"sqlite:///{tmp_path / 'l.db'}", throttle=LoginThrottle(free=5, base=0.5, cap=2))
    codes = [client.post("/api/login", json={"username": "alice", "password": "guess"}).status_code for _ in range(20)]
    assert codes[:5] == [401] * 5 and 429 in codes
    r = client.post("/api/login", json={"username": "alice", "password": "alice-pw"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    time.sleep(float(r.headers["Retry-After"]) + 0.1)
    assert client.post("/api/login", json={"username": "alice", "password": "alice-pw"}).status_code == 200
    actions = [
        json.loads(l)["action"] for l in client.get("/api/audit", headers=login(client, "root")).text.splitlines()
    ]
    assert actions.count("login_failed") >= 5 and "login" in actions and "import" not in actions[:1]


def test_the_login_throttle_stays_bounded_under_a_spray_of_names_and_forgets_old_failures(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("labeling_ui.auth.time.monotonic", lambda: clock[0])
    throttle = LoginThrottle(free=1, base=10, cap=60, forget=3600, max_keys=100)
    for _ in range(3):
        throttle.failed("user:alice", "addr:1.2.3.4")  # a real attack on alice, under back-off
    clock[0] += 1
    for i in range(1000):
        throttle.failed(f"user:made-up-{i}")
    assert len(throttle._state) <= 100
    assert throttle.retry_after("user:alice") == 0  # pushed out by 1000 newer failures: the oldest go first
    throttle.failed("user:bob")
    throttle.failed("user:bob")
    assert throttle.retry_after("user:bob") == 10
    clock[0] += 3601  # an hour without failures: bob starts again from his free attempt
    throttle.failed("user:bob")
    assert throttle.retry_after("user:bob") == 0


def test_unknown_users_and_wrong_passwords_take_the_same_time(tmp_path):
    store, client = make_env(f"sqlite:///{tmp_path / 'l.db'}", throttle=LoginThrottle(free=10**6))
    times = {"unknown": [], "wrong": []}
    for _ in range(7):
        for kind, name in (("unknown", "nobody"), ("wrong", "alice")):
            t0 = time.perf_counter()
            assert client.post("/api/login", json={"username": name, "password": "x"}).status_code == 401
            times[kind].append(time.perf_counter() - t0)
    unknown, wrong = statistics.median(times["unknown"]), statistics.median(times["wrong"])
    assert 0.8 < unknown / wrong < 1.25, times


def test_a_skip_is_the_annotators_own_and_fills_no_slot(env):
    store, client = env
    alice, bob = login(client, "alice"), login(client, "bob")
    first = client.get("/api/tasks/next?project=p", headers=alice).json()["id"]
    assert client.post(f"/api/tasks/{first}/annotations", json={"skip": True}, headers=alice).status_code == 201
    assert client.get("/api/tasks/next?project=p", headers=alice).json()["id"] != first  # never shown again
    assert client.get("/api/tasks/next?project=p", headers=bob).json()["id"] == first  # goes to someone else
    r = client.post(f"/api/tasks/{first}/annotations", json={"ranks": [1, 2]}, headers=bob)
    assert r.status_code == 201
    export = client.get("/api/projects/p/export", headers=login(client, "root")).text.splitlines()
    assert len(export) == 1 and json.loads(export[0])["annotators"] == ["bob"]


BAD_ANNOTATIONS = [
    {"ranks": [1, 2, 10**30]},
    {"ranks": [1, 99]},
    {"ranks": [2, 2]},
    {"ranks": [1, 2], "strength": 1.5},
    {"ranks": [1, 2], "unsafe": "x" * 50},
    {"ranks": [1, 2], "rationale": "x" * 6000},
    {"ranks": [1, 2], "rationale": "a\x00b"},
    {"ranks": [1, 2], "tags": ["t"] * 10_000},
    {"ranks": [1, 2], "tags": [{"a": 1}]},
    {"ranks": [1, 2], "tags": ["bell\x07"]},
    {"ranks": [1, 2], "surprise": 1},
]


@pytest.mark.parametrize("body", BAD_ANNOTATIONS, ids=range(len(BAD_ANNOTATIONS)))
def test_bad_annotations_are_422_and_leave_the_project_readable(env, body):
    store, client = env
    alice = login(client, "alice")
    task = client.get("/api/tasks/next?project=p", headers=alice).json()["id"]
    r = client.post(f"/api/tasks/{task}/annotations", json=body, headers=alice)
    assert r.status_code == 422, r.text
    root = login(client, "root")
    assert client.get("/api/projects/p/agreement", headers=root).status_code == 200
    assert client.post(f"/api/tasks/{task}/annotations", json={"ranks": [1, 2]}, headers=alice).status_code == 201


def test_non_finite_numbers_huge_ids_and_bodies_are_refused(tmp_path):
    store, client = make_env(f"sqlite:///{tmp_path / 'l.db'}", max_body_bytes=2**20)
    root, alice = login(client, "root"), login(client, "alice")
    items = [{"prompt": "q", "responses": ["a", "b"]}]
    assert client.post(f"/api/projects/p/tasks?overlap={2**70}", json=items, headers=root).status_code == 422
    assert client.post("/api/projects/p/tasks", json=items, headers=root).status_code == 201
    task = client.get("/api/tasks/next?project=p", headers=alice).json()["id"]
    for raw in ('{"ranks": [1, 2], "strength": NaN}', '{"ranks": [1, 2], "strength": Infinity}'):
        r = client.post(
            f"/api/tasks/{task}/annotations", content=raw, headers={**alice, "Content-Type": "application/json"}
        )
        assert r.status_code == 422, r.text
    assert client.post(f"/api/tasks/{2**70}/annotations", json={"ranks": [1, 2]}, headers=alice).status_code == 422
    big = {"ranks": [1, 2], "rationale": "x" * (10 * 2**20)}
    assert client.post(f"/api/tasks/{task}/annotations", json=big, headers=alice).status_code == 413
    bad_import = [
        {"prompt": [{"role": 5, "content": "x"}], "responses": ["a", "b"]},
        {"prompt": "q", "responses": ["a", "b"], "tags": [{"x": 1}]},
        {"prompt": "q\x00", "responses": ["a", "b"]},
    ]
    for item in bad_import:
        assert client.post("/api/projects/p/tasks", json=[item], headers=root).status_code == 422
    assert client.get("/api/projects/p%01/progress", headers=alice).status_code == 422


def test_control_characters_in_logins_member_names_and_user_names_are_refused(env):
    store, client = env
    assert client.post("/api/login", json={"username": "ali\x00ce", "password": "x"}).status_code == 422
    root = login(client, "root")
    assert client.post("/api/projects/p/members", json={"users": ["a\x00"]}, headers=root).status_code == 422
    for name in ("x" * 151, "bell\x07", " alice", "a#b", ""):
        with pytest.raises(ValueError):
            store.add_user(name, "annotator", "h")


def test_an_import_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    import labeling_ui.store as store_module

    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    monkeypatch.setattr(store_module, "IMPORT_CHUNK", 2)
    items = [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(5)] + [{"prompt": "q"}]  # no responses
    with pytest.raises(KeyError):
        store.import_tasks("new", items, 1)
    assert store.projects() == [] and store.counts()["tasks"] == 0


def test_bad_rows_stored_before_the_checks_are_reported_not_500(env, tmp_path):
    store, client = env
    alice = login(client, "alice")
    task = client.get("/api/tasks/next?project=p", headers=alice).json()["id"]
    assert client.post(f"/api/tasks/{task}/annotations", json={"ranks": [1, 2]}, headers=alice).status_code == 201
    with sqlite3.connect(tmp_path / "labels.db") as con:
        con.execute("UPDATE annotations SET ranks = '[1, 2, 1000000000000000000000000000000]'")
    root = login(client, "root")
    r = client.get("/api/projects/p/agreement", headers=root)
    assert r.status_code == 200 and len(r.json()["left_out"]) == 1
    assert client.get("/api/projects/p/export", headers=root).status_code == 200


def test_cli_accounts_and_bad_arguments_give_clear_errors(tmp_path, monkeypatch, capsys):
    """`align label users|members|audit` and `tags sample`, called as the command line calls them (in-process)."""
    import io

    from align.cli import main

    db = f"sqlite:///{tmp_path / 'l.db'}"

    def align(*args, stdin="pw\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse refused an argument
            code = stop.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    assert align("label", "users", "add", "ann", "--role", "annotator", "--db", db).returncode == 0
    again = align("label", "users", "add", "ann", "--role", "annotator", "--db", db)
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr
    blank = align("label", "users", "add", " ", "--role", "annotator", "--db", db)
    assert blank.returncode != 0 and "non-blank" in blank.stderr and "Traceback" not in blank.stderr
    assert align("label", "users", "set-role", "ann", "reviewer", "--db", db).returncode == 0
    assert align("label", "users", "passwd", "ann", "--db", db, stdin="new\n").returncode == 0
    assert align("label", "users", "disable", "ann", "--db", db).returncode == 0
    listed = align("label", "users", "list", "--db", db).stdout
    assert "ann" in listed and "reviewer" in listed and "disabled" in listed
    assert align("label", "users", "remove", "ann", "--db", db).returncode == 0
    missing = align("label", "users", "remove", "ann", "--db", db)
    assert missing.returncode != 0 and "no user 'ann'" in missing.stderr
    assert align("label", "audit", "--out", str(tmp_path / "audit.jsonl"), "--db", db).returncode == 0
    actions = [json.loads(l)["action"] for l in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert actions == ["user_add", "role_change", "password_change", "user_disable", "user_remove"]
    assert align("label", "users", "add", "m", "--role", "annotator", "--db", db).returncode == 0
    assert align("label", "members", "add", "proj", "m", "--db", db).returncode == 0
    assert align("label", "members", "list", "proj", "--db", db).stdout.split() == ["m"]
    ghost = align("label", "members", "add", "proj", "ghost", "--db", db)
    assert ghost.returncode != 0 and "no user 'ghost'" in ghost.stderr
    (tmp_path / "tagged.jsonl").write_text(json.dumps({"prompt": "x", "tags": ["a"]}) + "\n")
    neg = align(
        "tags", "sample", "--input", str(tmp_path / "tagged.jsonl"), "--output", str(tmp_path / "s.jsonl"), "--n", "-1"
    )
    assert (
        neg.returncode != 0
        and "--n: expected a whole number of at least 1, got -1" in neg.stderr
        and not (tmp_path / "s.jsonl").exists()
    )


annotation_bodies = st.fixed_dictionaries(
    {},
    optional={
        "ranks": st.one_of(st.none(), st.lists(st.integers(-5, 10**20), max_size=5)),
        "skip": st.booleans(),
        "all_bad": st.booleans(),
        "unsafe": st.one_of(st.none(), st.sampled_from(["violence", "privacy", ""]), st.text(max_size=120)),
        "tags": st.lists(st.text(max_size=30), max_size=5),
        "rationale": st.text(max_size=300),
        "strength": st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-3, 3)),
    },
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.one_of(st.sampled_from(["user", "assistant", "system"]), st.text(max_size=5), st.integers()),
            "content": st.one_of(st.text(max_size=50), st.integers(), st.none()),
        }
    ),
    max_size=3,
)
import_items = st.lists(
    st.fixed_dictionaries(
        {"prompt": st.one_of(st.text(max_size=50), messages), "responses": st.lists(st.text(max_size=30), max_size=4)},
        optional={"tags": st.one_of(st.lists(st.text(max_size=20), max_size=3), st.lists(st.integers(), max_size=2))},
    ),
    min_size=1,
    max_size=4,
)


def fuzz(url: str) -> None:
    store, client = make_env(url)
    root = login(client, "root")
    client.post("/api/projects/p/tasks", json=[{"prompt": "q", "responses": ["a", "b"]}] * 200, headers=root)
    annotators = [login(client, n) for n in ("alice", "bob")]
    task = client.get("/api/tasks/next?project=p", headers=annotators[0]).json()["id"]
    for body in BAD_ANNOTATIONS + [{"ranks": [1, 2], "unsafe": "u" * 500}, {"ranks": [2, 1], "tags": ["\x00"]}]:
        r = client.post(f"/api/tasks/{task}/annotations", json=body, headers=annotators[0])
        assert r.status_code == 422, (body, r.text)  # the same on SQLite and PostgreSQL (NUL, over-long fields)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=annotation_bodies, items=import_items, who=st.integers(0, 1))
    def run(body, items, who):
        r = client.post("/api/projects/f/tasks", json=items, headers=root)
        assert r.status_code in (201, 422), r.text
        got = client.get("/api/tasks/next?project=p", headers=annotators[who])
        assert got.status_code in (200, 204)
        if got.status_code == 200:
            r = client.post(f"/api/tasks/{got.json()['id']}/annotations", json=body, headers=annotators[who])
            assert r.status_code in (201, 409, 422), r.text
        for project in ("p", "f"):
            for what in ("agreement", "export"):
                r = client.get(f"/api/projects/{project}/{what}", headers=root)
                assert r.status_code in (200, 404), r.text
                if what == "agreement" and r.status_code == 200:
                    assert r.json()["left_out"] == []

    run()
    store.engine.dispose()


def test_fuzzed_submissions_and_imports_on_sqlite(tmp_path):
    fuzz(f"sqlite:///{tmp_path / 'fuzz.db'}")


@pytest.mark.slow
def test_fuzzed_submissions_and_imports_on_postgresql(tmp_path):
    pg = Postgres(tmp_path)
    url = pg.start()
    try:
        fuzz(url)
    finally:
        pg.stop()


@pytest.mark.slow
def test_reads_and_logins_do_not_wait_for_a_held_sqlite_write_lock_nor_next_for_a_big_import(tmp_path):
    db = tmp_path / "labels.db"
    store = Store(f"sqlite:///{db}")
    for name, role in USERS:
        store.add_user(name, role, hash_password(f"{name}-pw"))
    store.import_tasks("p", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(50)], 1)
    store.add_members("p", ["alice"])
    server = LabelServer(f"sqlite:///{db}", tmp_path / "server.log").start()
    try:
        token = httpx.post(f"{server.url}/api/login", json={"username": "alice", "password": "alice-pw"}).json()
        alice = {"Authorization": f"Bearer {token['token']}"}
        locked = threading.Event()

        def hold_the_write_lock():
            con = sqlite3.connect(db, timeout=30)
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO audit (time, actor, action, detail) VALUES ('2026-01-01', 'x', 'hold', '{}')")
            locked.set()
            time.sleep(5)
            con.rollback()
            con.close()

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        locked.wait()
        slow = []
        for url in ("/", "/api/projects/p/progress"):
            t0 = time.perf_counter()
            r = httpx.get(server.url + url, headers=alice, timeout=30)
            slow.append((url, r.status_code, time.perf_counter() - t0))
        holder.join()
        assert all(code == 200 and s < 0.5 for _, code, s in slow), slow

        root = {
            "Authorization": "Bearer "
            + httpx.post(f"{server.url}/api/login", json={"username": "root", "password": "root-pw"}).json()["token"]
        }
        items = [{"prompt": f"big {i}", "responses": ["a", "b"]} for i in range(20_000)]
        done = {}

        def big_import():
            done["r"] = httpx.post(f"{server.url}/api/projects/big/tasks", json=items, headers=root, timeout=300)

        importer = threading.Thread(target=big_import)
        importer.start()
        waits = []
        while importer.is_alive():
            t0 = time.perf_counter()
            r = httpx.get(f"{server.url}/api/tasks/next?project=p", headers=alice, timeout=30)
            waits.append(time.perf_counter() - t0)
            assert r.status_code in (200, 204)
        importer.join()
        assert done["r"].status_code == 201, done["r"].text
        assert len(waits) >= 3 and max(waits) < 1.0, waits
    finally:
        server.stop()
