"""The labelling store and REST API on SQLite: accounts, roles, leases, overlap, all-or-nothing import, export."""

import json
import threading

import pytest
from fastapi.testclient import TestClient

from labeling_ui.api import create_app
from labeling_ui.auth import hash_password, verify_password
from labeling_ui.export import merge_rankings
from labeling_ui.schema import SCHEMA_VERSION
from labeling_ui.store import Store
from rm.data import comparison_pairs


@pytest.fixture
def env(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    for name, role in (("alice", "annotator"), ("bob", "annotator"), ("carol", "annotator"), ("root", "admin")):
        store.add_user(name, role, hash_password(f"{name}-pw"))
    for project in ("p", "tr"):
        store.add_members(project, ["alice", "bob", "carol"])
    client = TestClient(create_app(store, known_tags={"math", "safety"}))
    tokens = {
        n: client.post("/api/login", json={"username": n, "password": f"{n}-pw"}).json()["token"]
        for n in ("alice", "bob", "carol", "root")
    }
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
    for method, url, kwargs in (
        ("post", "/api/projects/p/tasks", {"json": items}),
        ("get", "/api/projects/p/export", {}),
    ):
        assert getattr(client, method)(url, headers=auth("alice"), **kwargs).status_code == 403


def test_import_is_all_or_nothing_and_names_every_bad_item(env):
    store, client, auth = env
    items = [
        {"prompt": "ok", "responses": ["a", "b"]},
        {"prompt": "one", "responses": ["only"]},
        {"prompt": "tags", "responses": ["a", "b"], "tags": ["astrology"]},
        "not an object",
    ]
    out = client.post("/api/projects/p/tasks?overlap=2", json=items, headers=auth("root"))
    assert out.status_code == 422
    errors = out.json()["detail"]["errors"]
    assert [e.split(":")[0] for e in errors] == ["item 1", "item 2", "item 3"]
    assert store.counts()["tasks"] == 0


def test_annotate_overlap_and_export(env):
    store, client, auth = env
    items = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "responses": ["a", "b", "c"], "tags": ["math"]}
        for i in range(3)
    ]
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
            assert (
                client.post(
                    f"/api/tasks/{task['id']}/annotations", json={"ranks": ranks}, headers=auth(name)
                ).status_code
                == 201
            )
        seen[name] = got
    assert len(seen["alice"]) == len(set(seen["alice"])) == 3
    assert sum(len(v) for v in seen.values()) == 6  # 3 items x overlap 2
    assert (
        client.post(
            f"/api/tasks/{seen['alice'][0]}/annotations", json={"ranks": [1, 2, 3]}, headers=auth("alice")
        ).status_code
        == 409
    )  # never twice
    lines = client.get("/api/projects/p/export", headers=auth("root")).text.splitlines()
    records = [json.loads(l) for l in lines]
    assert len(records) == 3 and all(len(r["annotators"]) == 2 for r in records)
    pairs, ties = comparison_pairs(records[0], "export:1")  # the reward model reads the export as it is
    assert pairs and records[0]["tags"] == ["math"]


def test_wrong_number_of_ranks_is_refused(env):
    store, client, auth = env
    client.post("/api/projects/p/tasks", json=[{"prompt": "q", "responses": ["a", "b"]}], headers=auth("root"))
    task = client.get("/api/tasks/next?project=p", headers=auth("alice")).json()
    assert (
        client.post(
            f"/api/tasks/{task['id']}/annotations", json={"ranks": [1, 2, 3]}, headers=auth("alice")
        ).status_code
        == 422
    )
    assert (
        client.post(f"/api/tasks/{task['id']}/annotations", json={"skip": True}, headers=auth("alice")).status_code
        == 201
    )


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


def test_label_cli_users_import_export(tmp_path, monkeypatch, capsys):
    """`align label users|import|export` as the command line calls them (in-process)."""
    import io
    import subprocess
    import sys

    from align.cli import main

    db = f"sqlite:///{tmp_path / 'cli.db'}"

    def run(*a, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["label", *a])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(a, code, out.out, out.err)

    assert run("users", "add", "ann", "--role", "annotator", "--db", db, stdin="pw1\n").returncode == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "responses": ["a", "b"]}\n{oops\n{"prompt": "q", "responses": ["a"]}\n')
    out = run("import", "--project", "p", "--file", str(bad), "--db", db)
    assert out.returncode == 2 and "bad.jsonl:2: not valid JSON" in out.stderr and "bad.jsonl:3:" in out.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "q", "responses": ["a", "b"]}\n')
    assert run("import", "--project", "p", "--file", str(good), "--db", db, "--members", "ann").returncode == 0
    store = Store(db)
    user = store.user_by_name("ann")
    assert "pw1" not in user.password_hash and verify_password("pw1", user.password_hash)
    task = store.next_task("p", user.id)
    store.submit(task.id, user.id, ranks=[2, 1])
    assert run("export", "--project", "p", "--out", str(tmp_path / "out.jsonl"), "--db", db).returncode == 0
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["ranking"] == [2, 1] and record["responses"] == ["a", "b"]


def test_a_database_path_is_a_sqlite_file_and_an_unusable_database_is_named(tmp_path, monkeypatch, capsys):
    """`--db` takes a SQLite file's path as well as a URL; a database that cannot be used (no such folder, a server
    that refuses the connection, not a URL) stops with its name (password hidden) and exit status 2, not a
    traceback."""
    import io
    import sys

    from align.cli import main

    def run(*a, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["label", *a])
        return code, capsys.readouterr().err

    path = tmp_path / "plain.db"
    assert run("users", "add", "ann", "--role", "annotator", "--db", str(path), stdin="pw1\n")[0] == 0
    assert Store(f"sqlite:///{path}").user_by_name("ann") is not None  # the same file, by URL
    monkeypatch.chdir(tmp_path)
    assert Store("plain.db").user_by_name("ann") is not None  # a relative path, from the working folder
    code, err = run("users", "list", "--db", str(tmp_path / "missing" / "l.db"))
    assert code == 2 and f"folder {tmp_path / 'missing'} does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()
    code, err = run("audit", "--out", "a.jsonl", "--db", "postgresql://ann:s3cret@127.0.0.1:1/labels")
    assert code == 2 and "cannot be opened" in err and "127.0.0.1" in err and "s3cret" not in err
    code, err = run("users", "list", "--db", "mysql+nodriver://x/y")
    assert code == 2 and "not a database URL this app can use" in err
    db = str(path)
    for args, message in [
        (("export", "--project", "nope", "--out", "e.jsonl"), f"project 'nope' not found in {db}"),
        (("taxonomy", "export", "--name", "nope", "--out", "t.yaml"), f"no taxonomy 'nope' in {db}"),
        (("import", "--project", "p", "--file", str(tmp_path / "none.jsonl")), "none.jsonl: no such file or directory"),
    ]:  # fmt: skip
        code, err = run(*args, "--db", db)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


ADMIN_ENDPOINTS = [
    ("post", "/api/projects/p/tasks", {"json": [{"prompt": "q", "responses": ["a", "b"]}]}),
    ("get", "/api/projects/p/export", {}),
    ("get", "/api/projects/p/agreement", {}),
]


@pytest.mark.parametrize("method,url,kwargs", ADMIN_ENDPOINTS, ids=[u for _, u, _ in ADMIN_ENDPOINTS])
def test_annotator_token_gets_403(env, method, url, kwargs):
    store, client, auth = env
    client.post("/api/projects/p/tasks", json=[{"prompt": "q", "responses": ["a", "b"]}], headers=auth("root"))
    assert getattr(client, method)(url, headers=auth("alice"), **kwargs).status_code == 403
    assert getattr(client, method)(url, headers={"Authorization": "Bearer forged"}, **kwargs).status_code == 401


def test_agreement_statistics_by_hand():
    from labeling_ui.agreement import agreement, kendalls_w, krippendorff_alpha, pairwise_agreement

    # three raters, four responses: rank sums 4, 6, 8, 12; S = 35; W = 12 * 35 / (9 * 60)
    assert kendalls_w([[1, 2, 3, 4], [2, 1, 3, 4], [1, 3, 2, 4]]) == pytest.approx(420 / 540)
    assert kendalls_w([[1, 2, 3], [3, 2, 1]]) == pytest.approx(0.0)
    # ties: [1,1,2] and [1,2,3] -> average ranks [1.5,1.5,3], [1,2,3]; sums 2.5,3.5,6; S = 6.5; T = 6
    assert kendalls_w([[1, 1, 2], [1, 2, 3]]) == pytest.approx(12 * 6.5 / (4 * 24 - 2 * 6))
    # pairs (0,1),(0,2),(1,2): tie vs ordered, same, same -> 2/3
    assert pairwise_agreement([[1, 2, 2], [1, 2, 3]]) == pytest.approx(2 / 3)
    assert krippendorff_alpha([{"a": [1, 2, 3], "b": [1, 2, 3]}, {"a": [2, 1], "b": [2, 1]}]) == 1.0
    assert krippendorff_alpha([{"a": [1, 2, 3], "b": [3, 2, 1]}, {"a": [1, 2], "b": [2, 1]}]) < 0
    single = agreement([{"a": [1, 2]}])
    assert single["items_multi"] == 0 and single["kendall_w"] is None


def test_agreement_endpoint_undo_and_progress(env):
    store, client, auth = env
    items = [
        {"prompt": f"q{i}", "responses": ["a", "b", "c"], "tags": ["math" if i < 2 else "safety"]} for i in range(3)
    ]
    client.post("/api/projects/p/tasks?overlap=2", json=items, headers=auth("root"))
    plans = {"alice": [1, 2, 3], "bob": [1, 3, 2]}
    for name, ranks in plans.items():
        while (r := client.get("/api/tasks/next?project=p", headers=auth(name))).status_code == 200:
            body = {"ranks": ranks, "unsafe": "violence"} if r.json()["id"] == 3 and name == "bob" else {"ranks": ranks}
            client.post(f"/api/tasks/{r.json()['id']}/annotations", json=body, headers=auth(name))
    report = client.get("/api/projects/p/agreement", headers=auth("root")).json()
    assert report["overall"]["items_multi"] == 3
    assert report["overall"]["pairwise"] == pytest.approx(2 / 3)  # they differ on the pair (1, 2) only
    assert set(report["per_tag"]) == {"math", "safety"} and report["per_tag"]["math"]["items"] == 2
    assert [f["task"] for f in report["flagged"]] == [3] and report["flagged"][0]["unsafe"] == "violence"
    assert {a["annotator"] for a in report["annotators"]} == {"alice", "bob"}
    assert client.get("/api/projects/p/progress", headers=auth("alice")).json() == {
        "mine_done": 3,
        "mine_remaining": 0,
        "project_done": 6,
        "project_total": 6,
    }
    assert client.post("/api/projects/p/undo", headers=auth("alice")).json() == {"task": 3}
    assert client.get("/api/projects/p/progress", headers=auth("alice")).json()["mine_done"] == 2
    again = client.get("/api/tasks/next?project=p", headers=auth("alice")).json()
    assert again["id"] == 3  # the undone item comes back to its annotator
    assert client.get("/api/tasks/next?project=p", headers=auth("carol")).status_code == 204  # slot is held


def test_schema_migrates_an_old_database(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)  # the first schema: no lease creation time, no annotation duration
    con.executescript("""
        CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(200) UNIQUE, role VARCHAR(20), password_hash VARCHAR(300));
        CREATE TABLE tokens (token VARCHAR(100) PRIMARY KEY, user_id INTEGER, created DATETIME);
        CREATE TABLE projects (id INTEGER PRIMARY KEY, name VARCHAR(200) UNIQUE, guidelines TEXT);
        CREATE TABLE tasks (id INTEGER PRIMARY KEY, project_id INTEGER, prompt JSON, responses JSON, tags JSON,
                            meta JSON, overlap INTEGER);
        CREATE TABLE leases (id INTEGER PRIMARY KEY, task_id INTEGER, user_id INTEGER, expires DATETIME,
                             UNIQUE (task_id, user_id));
        CREATE TABLE annotations (id INTEGER PRIMARY KEY, task_id INTEGER, user_id INTEGER, ranks JSON, skipped BOOLEAN,
                                  all_bad BOOLEAN, unsafe VARCHAR(100), tags JSON, rationale TEXT, strength FLOAT,
                                  created DATETIME, UNIQUE (task_id, user_id));
        INSERT INTO users VALUES (1, 'old', 'annotator', 'x');
        INSERT INTO projects VALUES (1, 'p', '');
        INSERT INTO tasks VALUES (1, 1, '"q"', '["a", "b"]', '[]', '{}', 1);
        INSERT INTO annotations VALUES (1, 1, 1, '[2, 1]', 0, 0, NULL, '[]', '', NULL, '2026-01-01 00:00:00');
    """)
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    assert store.migrate() == SCHEMA_VERSION == 4
    [(task, anns)] = store.annotations("p")
    assert anns[0][0].ranks == [2, 1] and anns[0][0].seconds is None  # old data kept, new column added
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(annotations)")}
    assert "seconds" in cols
    assert task.closed  # filled from the annotations already there: it has its one annotation
    indexes = {r[1] for r in sqlite3.connect(db).execute("PRAGMA index_list(tasks)")}
    assert "ix_tasks_open" in indexes
    store.import_tasks("p", [{"prompt": "q2", "responses": ["a", "b"]}], 1)
    uid = store.user_by_name("old").id
    assert store.next_task("p", uid).prompt == "q2"


def test_closed_flag_follows_submissions_and_undo(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/l.db")
    users = [store.add_user(n, "annotator", "x") for n in ("a", "b", "c")]
    store.import_tasks("p", [{"prompt": "q", "responses": ["a", "b"]}], 2)
    closed = lambda: store.task(1).closed
    for uid, expect in ((users[0], False), (users[1], True)):
        assert store.next_task("p", uid).id == 1
        store.submit(1, uid, ranks=[1, 2])
        assert closed() is expect
    assert store.next_task("p", users[2]) is None  # closed: not handed out
    assert store.undo_last("p", users[1]) == 1 and closed() is False
    store.submit(1, users[1], ranks=[2, 1])
    assert closed() is True


def test_cli_import_names_bad_lines_and_checks_tags(tmp_path):
    import subprocess
    import sys

    good = {"prompt": "q", "responses": ["a", "b"], "tags": ["math"]}
    bad = tmp_path / "tasks.jsonl"
    bad.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{not json",
                json.dumps({"prompt": "q", "responses": ["a"]}),
                json.dumps({**good, "tags": ["astrology"]}),
            ]
        )
        + "\n"
    )
    taxonomy = tmp_path / "tax.yaml"
    taxonomy.write_text("tags:\n  - id: math\n")
    db = f"sqlite:///{tmp_path / 'l.db'}"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "align.cli",
            "label",
            "import",
            "--project",
            "p",
            "--file",
            str(bad),
            "--taxonomy",
            str(taxonomy),
            "--db",
            db,
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    for line in (2, 3, 4):
        assert f"tasks.jsonl:{line}:" in out.stderr
    assert "astrology" in out.stderr and Store(db).counts()["tasks"] == 0


def test_candidates_from_a_checkpoint(tmp_path):
    from base_model import QwenTokenizer, save_pretrained
    from base_model.model import QwenForCausalLM
    from conftest import tiny_config
    from labeling_ui.candidates import generate_candidates

    tok = QwenTokenizer.load("bytes")
    torch_model = QwenForCausalLM(tiny_config(vocab_size=len(tok) + 8))
    save_pretrained(torch_model, tmp_path / "m", tokenizer=tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello", "tags": ["math"]}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    done = []
    n = generate_candidates(tmp_path / "m", prompts, tmp_path / "tasks.jsonl", k=3, max_new_tokens=8, batch_size=1,
                            progress=done.append)  # fmt: skip
    assert done == [1, 1]
    rows = [json.loads(l) for l in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert n == 2 and all(len(r["responses"]) == 3 for r in rows) and rows[0]["tags"] == ["math"]
    assert rows[0]["meta"]["sampling"][0] == {"temperature": 0.0}
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    assert store.import_tasks("gen", rows, overlap=1) == 2


@pytest.mark.slow
def test_export_of_a_labelled_project_trains_a_reward_model(env, tmp_path):
    import subprocess
    import sys

    from align.world.preferences import translation_comparisons

    store, client, auth = env
    truth = translation_comparisons(64, seed=3)
    items = [{"prompt": r["prompt"], "responses": r["responses"]} for r in truth]
    client.post("/api/projects/tr/tasks?overlap=2", json=items, headers=auth("root"))
    by_prompt = {json.dumps(r["prompt"]) + r["responses"][0]: r["ranking"] for r in truth}
    for name in ("alice", "bob"):
        while (r := client.get("/api/tasks/next?project=tr", headers=auth(name))).status_code == 200:
            task = r.json()
            ranks = by_prompt[json.dumps(task["prompt"]) + task["responses"][0]]
            client.post(
                f"/api/tasks/{task['id']}/annotations", json={"ranks": ranks, "strength": 1.0}, headers=auth(name)
            )
    run = lambda *a: subprocess.run([sys.executable, "-m", "align.cli", *a], capture_output=True, text=True)
    out = run("label", "export", "--project", "tr", "--out", str(tmp_path / "export.jsonl"), "--db", store.url)
    assert out.returncode == 0, out.stderr
    out = run(
        "rm",
        "train",
        "configs/rm/tiny.yaml",
        f"data.train={tmp_path / 'export.jsonl'}",
        "train.max_steps=4",
        f"out_dir={tmp_path / 'rm'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "rm" / "final" / "reward_head.safetensors").exists()


def test_an_unsubmitted_item_returns_to_the_queue_when_its_lease_expires(env):
    import datetime as dt

    store, client, auth = env
    store.import_tasks("lease", [{"prompt": "q", "responses": ["a", "b"]}], overlap=1)
    alice, bob = store.user_by_name("alice").id, store.user_by_name("bob").id
    t0 = dt.datetime.utcnow()
    assert store.next_task("lease", alice, now=t0).id == 1
    assert store.next_task("lease", bob, now=t0 + dt.timedelta(seconds=60)) is None  # held by alice
    later = t0 + store.lease + dt.timedelta(seconds=1)
    assert store.next_task("lease", bob, now=later).id == 1  # alice walked away; the item went back
    store.submit(1, bob, ranks=[1, 2])
    with pytest.raises(Exception, match="already has its 1 annotations"):
        store.submit(1, alice, ranks=[2, 1])  # her stale lease cannot exceed the overlap
    assert len(store.annotations("lease")[0][1]) == 1


def test_safety_labels_of_converted_pku_rows_survive_import_and_export(tmp_path):
    """PKU-SafeRLHF rows → comparison records (`align data convert`) → tasks → the export keeps tags and meta."""
    from pathlib import Path

    from rm.data import load_comparisons

    rows = Path(__file__).parent / "fixtures" / "public_rows" / "pku_saferlhf_alpaca7b_test.jsonl"
    items, _ = load_comparisons(str(rows))
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_user("root", "admin", hash_password("root-pw"))
    store.add_user("ann", "annotator", hash_password("ann-pw"))
    store.add_members("safety", ["ann"])
    client = TestClient(create_app(store))
    token = lambda n: {"Authorization": "Bearer " + client.post(  # noqa: E731
        "/api/login", json={"username": n, "password": f"{n}-pw"}).json()["token"]}  # fmt: skip
    assert client.post("/api/projects/safety/tasks", json=items, headers=token("root")).status_code == 201
    ann = token("ann")
    while (r := client.get("/api/tasks/next?project=safety", headers=ann)).status_code == 200:
        assert (
            client.post(f"/api/tasks/{r.json()['id']}/annotations", json={"ranks": [2, 1]}, headers=ann).status_code
            == 201
        )
    exported = [
        json.loads(line) for line in client.get("/api/projects/safety/export", headers=token("root")).text.splitlines()
    ]
    by_prompt = {r["prompt"][0]["content"]: r for r in exported}
    explosives = by_prompt["Where can I find information on how to build my own explosives?"]
    assert explosives["tags"] == ["safety/endangering-national-security", "safety/violence"]
    assert explosives["meta"]["safe"] == [False, True] and explosives["meta"]["harm_categories"][0] == [
        "Endangering National Security",
        "Violence",
    ]
