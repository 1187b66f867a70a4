"""Reviewing a built taxonomy (the labelling app's Taxonomy tab and its REST API): edits that keep it valid and refuse
what would break it, a version per edit with its author, conflicting edits refused, roles enforced, and an export
that `align tags assign` reads."""

import json
import random
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from conftest import ROOT
from labeling_ui.api import create_app
from labeling_ui.auth import hash_password
from labeling_ui.store import Store
from labeling_ui.taxonomies import import_build
from rm.tags import review
from rm.tags.builder import build
from rm.tags.taxonomy import Taxonomy, TaxonomyError

FAMILY = ["python programming", "Python Programming", "python-programming", "python programs", "python coding"]


def raw_rows(seed: int = 0) -> list[dict]:
    """Queries with raw tags: spellings the rule step merges, a synonym pair the association step merges (always
    together), and other tags."""
    rng = random.Random(seed)
    rows = []
    for i in range(400):
        tags = [rng.choice(FAMILY)] if i % 2 else [rng.choice(["baking bread", "Baking Bread", "cooking pasta"])]
        if i % 5 == 0:
            tags += ["travel planning", "trip planning"]
        rows.append({"prompt": f"question {i} about {tags[0]}", "tags": tags})
    return rows


def built(tmp_path):
    rows = raw_rows()
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "align.cli", "tags", "build", "--input", str(tmp_path / "raw.jsonl"),
                          "--out", str(tmp_path / "tax"), "--eps", "0.2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp_path / "tax", tmp_path / "raw.jsonl"


def test_edits_keep_the_taxonomy_valid_and_refuse_what_would_break_it():
    result = build([r["tags"] for r in raw_rows()], alpha=5, semantic=False)
    tax = result.taxonomy
    py = tax.resolve("python programming")
    assert set(tax.tags[py].aliases) >= {"Python Programming", "python-programming"}
    renamed = review.rename(tax, py, "Programming in Python")
    assert renamed.tags[py].name == "Programming in Python" and renamed.resolve("python programming") == py
    assert tax.tags[py].name != "Programming in Python"  # the old version is untouched
    parent = review.move(renamed, py, tax.resolve("baking bread"))
    assert parent.tags[py].parent == tax.resolve("baking bread")
    with pytest.raises(TaxonomyError, match="cycle"):
        review.move(parent, tax.resolve("baking bread"), py)
    with pytest.raises(TaxonomyError, match="no tag"):
        review.move(tax, py, "no such tag")
    travel = tax.resolve("travel planning")
    assert tax.resolve("trip planning") == travel  # always together: the association step merged them
    split = review.split(tax, travel, ["trip planning"], "trips")
    assert split.resolve("trip planning") == "trips" and split.resolve("travel planning") == travel
    with pytest.raises(TaxonomyError, match="no alias"):
        review.split(tax, py, ["baking bread"], "z")
    with pytest.raises(TaxonomyError, match="cannot leave"):
        review.split(tax, py, ["python-programming"], "z")  # the same name as the tag, case and separators aside
    with pytest.raises(TaxonomyError, match="exists already"):
        review.split(tax, travel, ["trip planning"], tax.resolve("baking bread"))
    association = next(m for m in result.merges if m["step"] == "association")
    undone = review.undo_merge(tax, association)
    (merged,) = association["merged"]
    assert undone.resolve(merged) == merged and undone.resolve(association["into"]) == association["into"]
    rule = next(m for m in result.merges if m["step"] == "rule" and m["into"] == py)
    undone = review.undo_merge(tax, rule)
    assert undone.resolve("python programs") == "python programs"  # a spelling the stemmer merged
    assert undone.resolve("python-programming") == py  # the same name, separators aside: it cannot leave
    with pytest.raises(TaxonomyError, match="own already"):
        review.undo_merge(undone, rule)
    with pytest.raises(TaxonomyError, match="hold them apart"):
        review.undo_merge(tax, {"step": "rule", "into": py, "merged": ["Python Programming"]})


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    """`align tags build` once for the module's tests (its semantic step loads the embedding model): each test
    imports its own copy."""
    return built(tmp_path_factory.mktemp("built"))


@pytest.fixture
def app(tmp_path, built_once):
    folder, prompts = tmp_path / "tax", tmp_path / "raw.jsonl"
    shutil.copytree(built_once[0], folder)
    shutil.copyfile(built_once[1], prompts)
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    out = subprocess.run([sys.executable, "-m", "align.cli", "label", "taxonomy", "import", "--db", db, "--name",
                          "instag", "--build", str(folder), "--prompts", str(prompts)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    store = Store(db)
    for name, role in (("ann", "annotator"), ("rita", "reviewer"), ("ron", "reviewer"), ("root", "admin")):
        store.add_user(name, role, hash_password(f"{name}-pw"))
    client = TestClient(create_app(store))
    tokens = {n: client.post("/api/login", json={"username": n, "password": f"{n}-pw"}).json()["token"]
              for n in ("ann", "rita", "ron", "root")}  # fmt: skip
    return store, client, lambda n: {"Authorization": f"Bearer {tokens[n]}"}, tmp_path, db


@pytest.mark.slow
def test_review_through_the_api_versions_every_edit_and_exports_a_taxonomy_file(app):
    store, client, auth, tmp_path, db = app
    assert client.get("/api/taxonomies", headers=auth("ann")).status_code == 403  # annotators do not review
    assert client.get("/api/taxonomies/instag/tags", headers=auth("ann")).status_code == 403
    assert client.get("/api/taxonomies", headers=auth("rita")).json() == {
        "taxonomies": [{"name": "instag", "version": 1}]
    }
    found = client.get("/api/taxonomies/instag/tags", params={"q": "python"}, headers=auth("rita")).json()
    assert found["version"] == 1 and len(found["tags"]) == 1 and found["tags"][0]["prompts"] == 200
    tag = found["tags"][0]["id"]
    info = client.get("/api/taxonomies/instag/tag", params={"id": tag}, headers=auth("rita")).json()
    assert {"Python Programming", "python-programming", "python programs"} <= {a["raw"] for a in info["aliases"]}
    assert info["examples"] and all("question" in e for e in info["examples"])
    assert any(m["step"] == "rule" and "evidence" in m and m["undoable"] for m in info["merges"])

    def edit(who, base, action, **detail):
        return client.post("/api/taxonomies/instag/edits", headers=auth(who),
                           json={"base_version": base, "action": action, "detail": detail})  # fmt: skip

    assert edit("rita", 1, "rename", tag=tag, name="Python").json() == {"version": 2}
    assert edit("ron", 1, "move", tag=tag, parent=None).status_code == 409  # made from a version that is gone
    assert edit("ron", 2, "move", tag=tag, parent="no such tag").status_code == 422
    assert edit("ron", 2, "frobnicate", tag=tag).status_code == 422
    assert edit("ron", 2, "rename", tag=tag, name="Py\x00thon").status_code == 422  # a database refuses NUL
    assert edit("ann", 2, "rename", tag=tag, name="x").status_code == 403
    spelled = "python programs"
    assert edit("ron", 2, "split", tag=tag, aliases=["python-programming"], new_id="x").status_code == 422
    assert edit("ron", 2, "split", tag=tag, aliases=[spelled], new_id="python, plural").json() == {"version": 3}
    merge = next(m for m in info["merges"] if m["step"] == "rule")
    assert edit("rita", 3, "undo_merge", merge=merge["index"]).status_code == 201
    after = client.get("/api/taxonomies/instag/tag", params={"id": tag}, headers=auth("rita")).json()
    assert not next(m for m in after["merges"] if m["index"] == merge["index"])["undoable"]  # done: not offered again
    latest = client.get("/api/taxonomies/instag/versions", headers=auth("rita")).json()["versions"]
    assert [v["author"] for v in latest[:3]] == ["cli", "rita", "ron"] and latest[1]["action"] == "rename"
    for bad in (["1"], {"v": 1}, True, 99):  # never a 500: a version number that exists, or a 422
        assert edit("rita", latest[-1]["version"], "revert", version=bad).status_code == 422, bad
    assert edit("rita", latest[-1]["version"], "revert", version=1).status_code == 201

    exported = client.get("/api/taxonomies/instag/export", params={"version": 3}, headers=auth("rita"))
    assert exported.status_code == 200 and "version 3" in exported.text
    (tmp_path / "v3.yaml").write_text(exported.text)
    v3 = Taxonomy.load(tmp_path / "v3.yaml")
    assert v3.tags[tag].name == "Python" and v3.resolve(spelled) == "python, plural"
    # the exported version is what `align tags assign` reads
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "q", "tags": [spelled, "Python Programming"]}) + "\n")
    out = subprocess.run([sys.executable, "-m", "align.cli", "tags", "assign", "--input", str(tmp_path / "rows.jsonl"),
                          "--output", str(tmp_path / "assigned.jsonl"), "--taxonomy", str(tmp_path / "v3.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assigned = json.loads((tmp_path / "assigned.jsonl").read_text())
    assert set(assigned["tags"]) == {"python, plural", tag}
    # and the audit: the raw rows read in version 1 and in the reviewed version 3
    (tmp_path / "v1.yaml").write_text(client.get("/api/taxonomies/instag/export", params={"version": 1},
                                                 headers=auth("rita")).text)  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "align.cli", "tags", "audit", str(tmp_path / "raw.jsonl"), "--taxonomy",
                          str(tmp_path / "v1.yaml"), "--compare-taxonomy", str(tmp_path / "v3.yaml"), "--out",
                          str(tmp_path / "audit")], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "python, plural" in (tmp_path / "audit" / "comparison.html").read_text()
    # the command line exports the same file; the audit log has every edit
    out = subprocess.run([sys.executable, "-m", "align.cli", "label", "taxonomy", "export", "--db", db, "--name",
                          "instag", "--version", "3", "--out", str(tmp_path / "cli.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert Taxonomy.load(tmp_path / "cli.yaml").tags.keys() == v3.tags.keys()
    edits = [a for a in store.audit_log() if a["action"] == "taxonomy_edit"]
    assert [a["actor"] for a in edits][:2] == ["rita", "ron"]


@pytest.mark.slow
def test_import_refuses_a_taken_name_and_bad_tags(app):
    store, client, auth, tmp_path, _ = app
    body = {"name": "instag", "tags": [{"id": "a"}]}
    assert client.post("/api/taxonomies", json=body, headers=auth("rita")).status_code == 403
    assert client.post("/api/taxonomies", json=body, headers=auth("root")).status_code == 409
    body = {"name": "other", "tags": [{"id": "a", "parent": "missing"}]}
    assert client.post("/api/taxonomies", json=body, headers=auth("root")).status_code == 422
    body = {"name": "other", "tags": [{"id": "a"}, {"id": "b", "parent": "a"}]}
    assert client.post("/api/taxonomies", json=body, headers=auth("root")).status_code == 201
    assert client.get("/api/taxonomies/nope/tags", headers=auth("rita")).status_code == 404
    assert client.get("/api/taxonomies/other/tag", params={"id": "zz"}, headers=auth("rita")).status_code == 404
    with pytest.raises(Exception, match="exists already"):
        import_build(store, "instag", tmp_path / "tax")
