"""The demo's labelling stage: candidate tasks imported into a labelling database, ranked by simulated annotators
through the REST API, exported as comparison records — the path people and `align label` take."""

from __future__ import annotations

import json
import random
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from align.world import demo as world

if TYPE_CHECKING:  # the pipeline types live in align.demo, which imports this module
    from align.demo import DemoConfig, Pipeline


GUIDELINES = """# Ranking guidelines
1. A **correct** answer beats a wrong one: the right Chinese word, the right sum, the right number of metres.
2. A harmful request (weapons, break-ins, self-harm) should be **refused**; a refusal beats any help with it.
3. A harmless request should be **answered**: a needless refusal is as bad as a wrong answer.
4. Equally good (or equally bad) responses may share a rank.
"""


def run_labelling(cfg: DemoConfig, world_dir: Path, folder: Path) -> None:
    """Import the candidate tasks into a labelling database, let simulated annotators rank them through the
    REST API, and export the merged comparison records — the same path people and `align label` take."""
    from fastapi.testclient import TestClient

    from labeling_ui.agreement import project_report
    from labeling_ui.api import create_app, validate_items
    from labeling_ui.auth import hash_password
    from labeling_ui.store import Store
    from rm.tags.taxonomy import Taxonomy

    known = set(Taxonomy.load(world_dir / "taxonomy.yaml").tags)
    tasks = [json.loads(line) for line in (world_dir / "tasks.jsonl").read_text(encoding="utf-8").splitlines()]
    errors = validate_items(tasks, known)
    if errors:
        raise RuntimeError("demo tasks do not import: " + "; ".join(errors[:5]))
    db = folder / "labels.db"
    store = Store(f"sqlite:///{db}")
    passwords = {"admin": secrets.token_urlsafe(9), "reviewer": secrets.token_urlsafe(9)}
    store.add_user("admin", "admin", hash_password(passwords["admin"]))
    store.add_user("reviewer", "reviewer", hash_password(passwords["reviewer"]))
    sims = world.annotators(cfg.annotators, cfg.seed)
    for a in sims:
        passwords[a.name] = secrets.token_urlsafe(9)
        store.add_user(a.name, "annotator", hash_password(passwords[a.name]))
    passwords["you"] = secrets.token_urlsafe(9)
    store.add_user("you", "annotator", hash_password(passwords["you"]))
    # a small project left open for whoever opens the app on the demo data (`align label serve --demo`)
    store.import_tasks(
        "try-it", [{k: t[k] for k in ("prompt", "responses", "tags")} for t in tasks[:20]], 1, GUIDELINES
    )
    client = TestClient(create_app(store, known))
    token = lambda name: {
        "Authorization": "Bearer "
        + client.post("/api/login", json={"username": name, "password": passwords[name]}).json()["token"]
    }
    admin = token("admin")
    meta_by_key = {}
    for t in tasks:
        meta_by_key[json.dumps([t["prompt"], t["responses"]], ensure_ascii=False)] = t["meta"]["gold"]
    r = client.post(f"/api/projects/demo/tasks?overlap={cfg.overlap}", json=tasks, headers=admin)
    assert r.status_code == 201, r.text
    store.import_tasks("demo", [], cfg.overlap, GUIDELINES)
    everyone = ["reviewer", "you", *(a.name for a in sims)]
    store.add_members("demo", everyone)
    store.add_members("try-it", everyone)
    # annotators take turns, as people working side by side would; each stops at random moments
    rng = random.Random(cfg.seed)
    headers = {a.name: token(a.name) for a in sims}
    active = list(sims)
    while active:
        a = rng.choice(active)
        r = client.get("/api/tasks/next?project=demo", headers=headers[a.name])
        if r.status_code == 204:
            active.remove(a)
            continue
        task = r.json()
        gold = meta_by_key[json.dumps([task["prompt"], task["responses"]], ensure_ascii=False)]
        body = {"ranks": a.rank(gold), "tags": task["tags"]}
        if rng.random() < 0.02:
            body = {"skip": True}
        r = client.post(f"/api/tasks/{task['id']}/annotations", json=body, headers=headers[a.name])
        assert r.status_code == 201, r.text
    export = client.get("/api/projects/demo/export", headers=admin).text
    (folder / "export.jsonl").write_text(export, encoding="utf-8")
    report = project_report(store.annotations("demo"))
    (folder / "agreement.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (folder / "accounts.json").write_text(json.dumps(passwords, indent=1))
    (folder / "accounts.json").chmod(0o600)
    store.engine.dispose()


def write_labelling_help(p: Pipeline) -> None:
    accounts = json.loads(p.path("labels", "accounts.json").read_text())
    text = (
        f"Labelling app on the demo data: align label serve --demo {p.out}\n"
        f"  then open http://127.0.0.1:7860/ and log in as 'you' (password {accounts['you']}) to rank the demo "
        f"tasks, or as 'reviewer' (password {accounts['reviewer']}) to see agreement.\n"
        f"  Accounts: {p.path('labels', 'accounts.json')}\n"
    )
    (p.out / "labelling.txt").write_text(text, encoding="utf-8")
