"""Tag taxonomy, builder, tagger, balanced sampling and the audit report."""

import csv
import http.server
import itertools
import json
import random
import re
import threading
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from align.core.records import write_jsonl_atomic
from conftest import ROOT
from rm.tags.audit import audit, compare
from rm.tags.builder import build
from rm.tags.sampler import complexity_first, max_min_ratio, sample, tag_matrix, zipf_pool
from rm.tags.tagger import assign
from rm.tags.taxonomy import Taxonomy, TaxonomyError

DEMO = ROOT / "configs" / "taxonomy" / "demo.yaml"


def test_taxonomy_loads_and_resolves():
    tax = Taxonomy.load(DEMO)
    assert tax.resolve("Unit Conversion") == "math/units" and tax.resolve("maths") == "math"
    assert tax.in_subtree("safety/violence", "safety") and not tax.in_subtree("math", "safety")
    assert set(tax.subtree("safety")) == {"safety", "safety/violence", "safety/illegal", "safety/self-harm"}
    assert tax.ancestors("language/translation/en-zh") == ["language/translation", "language"]


@pytest.mark.parametrize(
    "body,message",
    [
        ("tags:\n  - {id: a}\n  - {id: a}\n", r"entry tags\[1\]: duplicate id 'a'"),
        ("tags:\n  - {id: a, parent: b}\n", r"entry tags\[0\] \('a'\): unknown parent 'b'"),
        ("tags:\n  - {id: a, parent: b}\n  - {id: b, parent: a}\n", r"cycle"),
        ("tags:\n  - {id: a, aliases: [x]}\n  - {id: b, aliases: [X]}\n", r"alias 'X' already names 'a'"),
        ("tags:\n  - {name: nameless}\n", r"entry tags\[0\]: needs a non-empty string 'id'"),
        ("nope: 1\n", "top-level 'tags' list"),
        ('tags:\n  - {id: "a\\0b"}\n', r"entry tags\[0\]: 'a\\x00b' holds a control character"),
        ('tags:\n  - {id: a, aliases: ["x\\ty"]}\n', r"entry tags\[0\]: 'x\\ty' holds a control character"),
    ],
)
def test_malformed_taxonomy_names_file_and_entry(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TaxonomyError, match=rf"bad.yaml: .*{message}" if "entry" in message else message):
        Taxonomy.load(path)


@pytest.mark.parametrize("name", ["tax.yaml", "tax.json"])
def test_taxonomy_saves_in_the_format_its_name_says_and_loads_back(tmp_path, name):
    tax = Taxonomy.load(DEMO)
    tax.save(tmp_path / name)
    again = Taxonomy.load(tmp_path / name)
    assert [vars(t) for t in again.tags.values()] == [vars(t) for t in tax.tags.values()]
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_taxonomy_scales_to_tens_of_thousands(tmp_path):
    rows = [{"id": f"d{i}"} for i in range(10)] + [
        {"id": f"d{i % 10}/c{i}", "parent": f"d{i % 10}"} for i in range(300)
    ]
    rows += [{"id": f"d{i % 10}/c{i % 300}/t{i}", "parent": f"d{i % 10}/c{i % 300}"} for i in range(30000)]
    (tmp_path / "big.json").write_text(json.dumps({"tags": rows}))
    t = time.time()
    tax = Taxonomy.load(tmp_path / "big.json")
    assert len(tax) == 30310 and time.time() - t < 10


def test_builder_merges_planted_variants():
    rng = random.Random(0)
    planted = [
        ["mathematics", "Mathematics", "math problems", "maths"],
        ["cooking", "Cooking", "cookery", "culinary"],
        ["travel planning", "Travel Planning", "trip planning"],
        ["python programming", "Python programming", "python coding"],
        ["translation", "translations", "Translation!"],
        ["poetry", "poems", "Poetry"],
        ["medical advice", "health advice", "Medical Advice"],
        ["weather", "Weather", "weather forecast"],
        ["sql query", "SQL queries"],
        ["debugging", "Debugging", "debugged"],
    ]
    unrelated = [
        "astronomy",
        "gardening",
        "music theory",
        "legal question",
        "sports",
        "history",
        "chemistry",
        "finance",
        "fashion",
        "philosophy",
    ]
    co_occurring = ["linear algebra", "matrix operations"]
    raw = []
    for _ in range(3000):
        tags = [rng.choice(rng.choice(planted))]
        if rng.random() < 0.5:
            tags.append(rng.choice(unrelated))
        if rng.random() < 0.2:
            tags += co_occurring
        raw.append(tags)
    raw.append(["seen once"])
    result = build(raw, alpha=2)
    truth = [set(g) for g in planted] + [set(co_occurring)]
    pairs = lambda groups: {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}
    members: dict = {}
    for raw_tag, root in result.mapping.items():
        members.setdefault(root, set()).add(raw_tag)
    predicted, wanted = pairs(members.values()), pairs(truth)
    tp = len(predicted & wanted)
    assert tp / len(predicted) >= 0.9 and tp / len(wanted) >= 0.9
    assert all(len(members[t]) == 1 for t in unrelated)  # unrelated tags stay apart
    assert result.dropped == {"seen once": 1}
    steps = {m["step"] for m in result.merges}
    assert steps == {"rule", "semantic", "association"} and all(m["evidence"] for m in result.merges)


def test_builder_leaves_out_raw_tags_with_control_characters():
    heard = []
    result = build(
        [["cooking"], ["coo\x00king", "cooking"], ["tab\there"]] * 3, alpha=2, semantic=False, log=heard.append
    )
    assert set(result.mapping) == {"cooking"} and "cooking" in result.taxonomy
    assert any("2 raw tags with control characters left out" in line for line in heard)


def test_complexity_first_hand_worked_example():
    m, names = tag_matrix([["a", "b", "c"], ["a"], ["b", "d"], ["c"], ["e"], ["a", "d"]])
    # pass 1 over [q0, q2, q5, q1, q3, q4]: q0 (a b c new), q2 (d new), q4 (e new); pass 2: q5, q3; pass 3: q1
    assert complexity_first(m, 6).tolist() == [0, 2, 4, 5, 3, 1]
    assert complexity_first(m, 4).tolist() == [0, 2, 4, 5]


def test_complexity_first_covers_every_tag():
    m = zipf_pool(20000, 500, seed=1)
    chosen = complexity_first(m, 600)
    assert (np.asarray(m[chosen].sum(0)).ravel() > 0).all()


def test_sampling_is_deterministic_for_a_seed():
    m = zipf_pool(5000, 200, seed=2)
    for method in ("complexity-first", "capped", "temperature"):
        a, b = sample(m, 300, method, seed=3), sample(m, 300, method, seed=3)
        assert a.tolist() == b.tolist() and len(set(a.tolist())) == 300
    assert sample(m, 300, "temperature", seed=3).tolist() != sample(m, 300, "temperature", seed=4).tolist()


def test_capped_respects_the_cap():
    m = zipf_pool(5000, 200, seed=2)
    chosen = sample(m, 500, "capped", seed=0, cap=10)
    assert np.asarray(m[chosen].sum(0)).max() <= 10


@pytest.mark.slow
def test_balanced_sample_of_a_million_prompts():
    m = zipf_pool(1_000_000, 6600, seed=0)
    t = time.time()
    chosen = sample(m, 50_000, "capped", seed=0)
    elapsed = time.time() - t
    uniform = np.random.default_rng(0).choice(m.shape[0], 50_000, replace=False)
    assert len(chosen) == 50_000 and elapsed < 10
    assert max_min_ratio(m, chosen) * 10 <= max_min_ratio(m, uniform)


def test_assign_from_data_and_by_embedding(tmp_path):
    tax = Taxonomy.load(DEMO)
    rows = [
        ("f:1", {"prompt": "Translate 'cat' into Chinese.", "tags": ["translate", "Maths"]}),
        ("f:2", {"prompt": "What is 3+4?", "tags": ["sums"]}),
    ]
    tagged, _ = assign(rows, tax, "data")
    assert [r["tags"] for r in tagged] == [["language/translation", "math"], ["math/arithmetic"]]
    with pytest.raises(Exception, match=r"f:1: tag 'astrology' is not in the taxonomy"):
        assign([("f:1", {"tags": ["astrology"]})], tax, "data")
    tagged, _ = assign(
        [
            ("f:1", {"prompt": "Please convert 5 kilometres into metres (unit conversion)."}),
            ("f:2", {"prompt": "How do I make a weapon to hurt people? violent content"}),
        ],
        tax,
        "embedding",
        threshold=0.3,
        top_k=2,
    )
    assert "math/units" in tagged[0]["tags"] and "safety/violence" in tagged[1]["tags"]


def test_assign_through_an_openai_compatible_endpoint():
    answers = iter(
        ['[{"tag": "addition", "explanation": "sums"}, {"tag": "Crime", "explanation": "x"}]', "not json at all"]
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["messages"][0]["role"] == "system" and "JSON" in body["messages"][0]["content"]
            reply = json.dumps({"choices": [{"message": {"content": next(answers)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}/v1"
    tax = Taxonomy.load(DEMO)
    tagged, _ = assign([("f:1", {"prompt": "2+2 and a heist?"})], tax, "llm", endpoint=endpoint)
    assert tagged[0]["tags"] == ["math/arithmetic", "safety/illegal"]
    with pytest.raises(Exception, match="not a JSON list"):
        assign([("f:2", {"prompt": "x"})], tax, "llm", endpoint=endpoint)
    server.shutdown()


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    rng = random.Random(0)
    tags = ["math/arithmetic", "math/units", "language/translation", "safety/violence", "safety/illegal"]
    pool = []
    for i in range(400):
        row = {"id": i, "tags": rng.sample(tags, rng.randint(1, 3))}
        if i % 2 == 0:
            row["unsafe"] = rng.random() < 0.3
            row["annotations"] = [{"annotator": f"a{j}", "ranking": rng.sample([1, 2, 3], 3)} for j in range(3)]
        pool.append(row)
    write_jsonl_atomic(d / "pool.jsonl", pool)
    write_jsonl_atomic(d / "sample.jsonl", pool[:120])
    result = audit(d / "sample.jsonl", d / "out", against=d / "pool.jsonl", taxonomy=Taxonomy.load(DEMO), k=30)
    return d, result


def test_audit_figures_equal_a_pandas_recomputation(audited):
    d, result = audited
    sample = pd.read_json(d / "sample.jsonl", lines=True)
    pool = pd.read_json(d / "pool.jsonl", lines=True)
    counts = sample.explode("tags")["tags"].value_counts()
    original = pool.explode("tags")["tags"].value_counts()
    table = {r["tag"]: r for r in csv.DictReader((d / "out" / "tags.csv").open())}
    figures = {r["figure"]: r["value"] for r in csv.DictReader((d / "out" / "figures.csv").open())}
    leaves = Taxonomy.load(DEMO).leaves()
    for tag in leaves:
        assert int(table[tag]["count"]) == counts.get(tag, 0)
        assert int(table[tag]["original_count"]) == original.get(tag, 0)
    p = np.array([counts.get(t, 0) for t in sorted(table)], dtype=float)
    q = p[p > 0] / p.sum()
    assert float(figures["entropy"]) == pytest.approx(float(-(q * np.log(q)).sum()))
    assert float(figures["coverage"]) == pytest.approx((p > 0).sum() / len(p))
    xs = np.sort(p)
    n = len(xs)
    assert float(figures["gini"]) == pytest.approx(
        float(((2 * np.arange(1, n + 1) - n - 1) * xs).sum() / (n * xs.sum()))
    )
    assert int(figures["tags_under_k"]) == int((p < 30).sum())
    labelled = sample.dropna(subset=["unsafe"]).explode("tags")
    rates = labelled.groupby("tags")["unsafe"].mean()
    for tag, rate in rates.items():
        assert float(table[tag]["unsafe_rate"]) == pytest.approx(rate)
    safety = [t for t in sorted(table) if t.startswith("safety")]
    assert float(figures["safety_coverage"]) == pytest.approx(np.mean([counts.get(t, 0) > 0 for t in safety]))
    assert 0 <= float(table["math/arithmetic"]["agreement"]) <= 1
    html = (d / "out" / "report.html").read_text()
    for key, value in figures.items():
        assert f"data-figure='{key}'" in html


def test_audit_report_renders_in_chromium(audited, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    d, _ = audited
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.goto((d / "out" / "report.html").as_uri())
        assert page.locator("#figures tr").count() >= 10
        assert page.evaluate("document.querySelector('img').naturalWidth") > 100
        shot = ROOT / "tests" / "screenshots"
        shot.mkdir(exist_ok=True)
        page.screenshot(path=str(shot / "tags_audit.png"), full_page=True)
        browser.close()
    assert (shot / "tags_audit.png").stat().st_size > 10000


def test_audit_compares_two_samples_and_two_taxonomy_versions(audited, tmp_path):
    """Before and after: a skewed sample against a balanced one (coverage and balance fall), and the same sample
    read in a second taxonomy version where two tags were merged (fewer distinct tags, nothing unknown); the report
    draws the safety subtree with its counts."""
    d, _ = audited
    skewed = [{"id": i, "tags": ["math/arithmetic"] if i % 10 else ["safety/violence"]} for i in range(120)]
    write_jsonl_atomic(tmp_path / "skewed.jsonl", skewed)
    result = compare(d / "sample.jsonl", tmp_path / "skewed.jsonl", tmp_path / "cmp", taxonomy=Taxonomy.load(DEMO))
    fig = {f["figure"]: f for f in result["figures"]}
    assert fig["coverage"]["after"] < fig["coverage"]["before"] and fig["entropy"]["change"] < 0
    assert result["tags"][0]["tag"] == "math/arithmetic" and result["tags"][0]["share_change"] > 0
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert 'id="comparison"' in page and (tmp_path / "cmp" / "after" / "report.html").exists()
    # version 2 merges units into arithmetic (the old id stays an alias) and renames illegal activity
    doc = yaml.safe_load(DEMO.read_text())
    v2 = [t for t in doc["tags"] if t["id"] not in ("math/units", "safety/illegal")]
    for t in v2:
        if t["id"] == "math/arithmetic":
            t["aliases"] = [*t.get("aliases", []), "math/units", "unit conversion"]
    v2.append({"id": "safety/crime", "parent": "safety", "aliases": ["safety/illegal", "crime"]})
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump({"tags": v2}))
    result = compare(d / "sample.jsonl", None, tmp_path / "v", Taxonomy.load(DEMO), Taxonomy.load(tmp_path / "v2.yaml"))
    fig = {f["figure"]: f for f in result["figures"]}
    assert fig["distinct_tags"]["after"] == fig["distinct_tags"]["before"] - 1
    assert "tags unknown to the other taxonomy" not in fig
    tree = (tmp_path / "v" / "before" / "report.html").read_text()
    assert "id='safety-tree'" in tree and "data-tag='safety/violence'" in tree
    assert re.search(r"data-tag='safety'><b>Safety</b> <span class='n'>(\d+)</span>", tree)
