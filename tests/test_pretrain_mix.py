"""Pretraining data for specialist models: sources mixed by weight (instruction data into pretraining), decontaminated
against the benchmarks; code-aware near-duplicate removal; learned quality filters with measured precision/recall."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from align.core.records import DataError, write_jsonl_atomic
from align.eval.code import humaneval_path
from base_model import QwenTokenizer
from base_model.pretrain.classifier import TextClassifier, classify_documents, train_classifier
from base_model.pretrain.dedup import dedup
from base_model.pretrain.packing import PackedDataset, pack_mix
from conftest import ROOT

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud field".split()


def source(path, tag, n, rng, lo=20, hi=400):
    write_jsonl_atomic(
        path, [{"text": tag + " " + " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))} for _ in range(n)]
    )


def shares_in_packed(folder, tok, tags):
    """Each source's share of the packed tokens, read back from tokens.bin (documents start with their tag)."""
    ds = PackedDataset(folder)
    flat = np.asarray(ds.tokens).reshape(-1)
    docs = np.split(flat, np.flatnonzero(flat == tok.eod_id) + 1)
    counts = dict.fromkeys(tags, 0)
    for d in docs:
        text = tok.decode([int(t) for t in d if t != tok.eod_id])
        for tag in tags:
            if text.startswith(tag + " "):
                counts[tag] += len(d)
    total = sum(counts.values())
    return {t: c / total for t, c in counts.items()}


def test_mix_gives_the_requested_proportions_within_one_percent(tmp_path):
    rng = random.Random(0)
    tok = QwenTokenizer.from_bytes()
    source(tmp_path / "web.jsonl", "WEB", 1500, rng)
    source(tmp_path / "code.jsonl", "CODE", 1500, rng)
    source(tmp_path / "inst.jsonl", "INST", 60, rng)  # small: repeated to reach its share
    mix = [(tmp_path / "web.jsonl", 6), (tmp_path / "code.jsonl", 3), (tmp_path / "inst.jsonl", 1)]
    index = pack_mix(mix, tmp_path / "packed", tok, seq_len=512, total_tokens=1_500_000)
    shares = shares_in_packed(tmp_path / "packed", tok, ["WEB", "CODE", "INST"])
    for tag, want in zip(("WEB", "CODE", "INST"), (0.6, 0.3, 0.1)):
        assert abs(shares[tag] - want) < 0.01, shares
    assert {s["source"].split("/")[-1]: s["passes"] for s in index["mix"]}["inst.jsonl"] > 1
    assert 1_500_000 <= index["n_tokens"] < 1_500_000 + 3 * 3000  # overshoot: under one document per source
    # the default size repeats nothing: the scarcest source (for its weight) is used exactly once
    index = pack_mix(mix, tmp_path / "once", tok, seq_len=512)
    assert [s["passes"] for s in index["mix"]] == [1, 1, 1]


def test_instruction_rows_enter_as_chatml_and_benchmarks_are_kept_out(tmp_path):
    tok = QwenTokenizer.from_bytes()
    he = [json.loads(line) for line in __import__("gzip").open(humaneval_path(), "rt")]
    leaked = {"text": "def helper():\n    pass\n" + he[3]["prompt"]}  # a HumanEval prompt copied into a file
    write_jsonl_atomic(tmp_path / "code.jsonl", [leaked] + [{"text": f"x = {i}\nprint(x * 2)\n"} for i in range(30)])
    write_jsonl_atomic(
        tmp_path / "inst.jsonl",
        [{"messages": [{"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
         for i in range(20)],
    )  # fmt: skip
    index = pack_mix([(tmp_path / "code.jsonl", 0.8), (tmp_path / "inst.jsonl", 0.2)], tmp_path / "p", tok, 256,
                     decontaminate_against=[humaneval_path()])  # fmt: skip
    assert [s["contaminated_dropped"] for s in index["mix"]] == [1, 0]
    flat = np.asarray(PackedDataset(tmp_path / "p").tokens).reshape(-1).tolist()
    assert tok.im_start_id in flat and tok.im_end_id in flat  # the conversations as the chat model will see them
    text = tok.decode([t for t in flat if t < 256])
    assert he[3]["entry_point"] not in text
    with pytest.raises(DataError, match="weights must be positive"):
        pack_mix([(tmp_path / "code.jsonl", 0)], tmp_path / "q", tok, 256)


def test_mix_on_the_command_line(tmp_path):
    rng = random.Random(1)
    source(tmp_path / "a.jsonl", "A", 200, rng)
    source(tmp_path / "b.jsonl", "B", 200, rng)
    out = subprocess.run([sys.executable, "-m", "align.cli", "data", "pack", "--mix", f"{tmp_path}/a.jsonl:0.75",
                          f"{tmp_path}/b.jsonl:0.25", "--tokenizer", "bytes", "--seq-len", "256", "--output",
                          str(tmp_path / "p")], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "weight 0.750, share 0.74" in out.stdout or "weight 0.750, share 0.75" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "align.cli", "data", "pack", "--mix", "a.jsonl", "--output", "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "expected FILE:WEIGHT" in bad.stderr


def random_code(rng: random.Random, brace: bool) -> str:
    """A made-up source file (Python-like or C-like), different enough from any other to share few shingles."""
    names = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 8))) for _ in range(6)]
    lines = []
    for _ in range(rng.randint(12, 20)):
        a, b, c = rng.sample(names, 3)
        n, m = rng.randint(0, 999), rng.randint(2, 9)
        lines.append(rng.choice([f"{a} = {b} + {n}", f"{a} = {b}({c}, {n})", f"if {a} > {n}: {b} = {c} * {m}",
                                 f"for {a} in range({n}): {b}.append({a} ** {m})", f"{a}.{b}({c}[{n}])",
                                 f"return {a} - {c} / {m}"]))  # fmt: skip
    if brace:
        return "int " + names[0] + "() {\n" + "".join(f"    {l.replace(': ', ' { ')};\n" for l in lines) + "}\n"
    return f"def {names[0]}():\n" + "".join(f"    {l}\n" for l in lines)


def vendored(code: str, brace: bool, rng: random.Random, edit: bool) -> str:
    """The same file as another repository has it: a licence header, other comments and layout, maybe one edit."""
    c = "//" if brace else "#"
    lines = code.splitlines()
    if edit:
        i = rng.randrange(1, len(lines) - 1)
        lines[i] = lines[i] + (" ;" if brace else "  # patched") + ("" if brace else "")
        lines.insert(i, lines[i].replace("=", "= 1 +", 1) if "=" in lines[i] else lines[i])
    body = "\n".join(l.replace("    ", "  ") + (f"  {c} vendored" if k % 4 == 0 else "") for k, l in enumerate(lines))
    return f"{c} Copyright (c) 2019 Some Project Authors.\n{c} Licensed under the MIT licence.\n\n{body}\n"


def test_code_dedup_finds_copies_across_repositories(tmp_path):
    rng = random.Random(0)
    rows, planted = [], set()
    for i in range(60):
        brace = i % 2 == 1
        code = random_code(rng, brace)
        rows.append({"text": code, "repo": f"org{i}/orig"})
        if rng.random() < 0.5:
            planted.add(len(rows))
            rows.append({"text": vendored(code, brace, rng, edit=i % 3 == 0), "repo": f"fork{i}/vendor"})
    write_jsonl_atomic(tmp_path / "code.jsonl", rows)
    code_report = dedup([tmp_path / "code.jsonl"], tmp_path / "kept.jsonl", threshold=0.7, code=True)
    dropped = {d for c in code_report.clusters for d in c["dropped"]}
    assert dropped == planted, (sorted(dropped), sorted(planted))
    assert code_report.near_dropped > 0 and code_report.exact_dropped > 0  # edited copies, and layout-only copies
    text_report = dedup([tmp_path / "code.jsonl"], tmp_path / "kept_text.jsonl", threshold=0.7)
    assert text_report.near_dropped + text_report.exact_dropped < len(planted)  # word shingles miss many copies


def planted_quality(n: int, seed: int):
    """Good documents (varied sentences) and junk (keyword stuffing, boilerplate, markup debris), for a classifier."""
    rng = random.Random(seed)
    subjects = "The committee|A researcher|The river|Our team|The old library|Every student|The market".split("|")
    verbs = "examined|described|measured|improved|visited|explained|compared|questioned".split("|")
    objects = "the annual report|a new method|the water level|the results|its history|two theories|local prices"
    objects = objects.split("|")
    good = [
        " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(4, 9)))
        for _ in range(n)
    ]
    spam_words = "buy cheap free click now best deal casino viagra win prize offer".split()
    junk = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            junk.append(" ".join(rng.choices(spam_words, k=rng.randint(15, 40))))
        elif kind < 0.7:
            junk.append(" | ".join(rng.choices(["Home", "Login", "Contact", "Privacy", "Terms", "Sitemap"], k=12)))
        else:
            junk.append(" ".join("".join(rng.choices("<>/{}=;&#%0123456789abcdef", k=rng.randint(3, 9)))
                                 for _ in range(rng.randint(10, 30))))  # fmt: skip
    return good, junk


def test_quality_classifier_reaches_stated_precision_and_recall(tmp_path):
    good, junk = planted_quality(400, seed=0)
    write_jsonl_atomic(tmp_path / "good.jsonl", [{"text": t} for t in good])
    write_jsonl_atomic(tmp_path / "junk.jsonl", [{"text": t} for t in junk])
    out = subprocess.run([sys.executable, "-m", "align.cli", "data", "train-classifier", "--positive",
                          str(tmp_path / "good.jsonl"), "--negative", str(tmp_path / "junk.jsonl"), "--out",
                          str(tmp_path / "quality.joblib")], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    card = json.loads((tmp_path / "quality.joblib.json").read_text())
    assert card["heldout"]["precision"] >= 0.95 and card["heldout"]["recall"] >= 0.95, card["heldout"]
    assert "threshold  precision  recall" in out.stdout
    # a fresh planted test set (other seed), mixed, filtered with --min-score: the stated figures hold on it
    good2, junk2 = planted_quality(200, seed=7)
    rows = [{"text": t, "good": True} for t in good2] + [{"text": t, "good": False} for t in junk2]
    random.Random(3).shuffle(rows)
    write_jsonl_atomic(tmp_path / "mixed.jsonl", rows)
    counts = classify_documents([tmp_path / "mixed.jsonl"], tmp_path / "kept.jsonl", tmp_path / "quality.joblib",
                                min_score=0.5, rejected=tmp_path / "rejected.jsonl")  # fmt: skip
    kept = [json.loads(l) for l in (tmp_path / "kept.jsonl").read_text().splitlines()]
    precision = sum(r["good"] for r in kept) / len(kept)
    recall = sum(r["good"] for r in kept) / len(good2)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, counts)
    assert counts["kept"] + counts["below_min_score"] == 400
    # the same classifier as an offensive-content style filter: keep what scores at most X
    low = classify_documents([tmp_path / "mixed.jsonl"], tmp_path / "low.jsonl", tmp_path / "quality.joblib",
                             max_score=0.5)  # fmt: skip
    assert low["kept"] == counts["below_min_score"]
    scores = TextClassifier(tmp_path / "quality.joblib").score([good2[0], junk2[0]])
    assert scores[0] > 0.5 > scores[1]
    write_jsonl_atomic(tmp_path / "one.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="at least 5 documents"):
        train_classifier([tmp_path / "good.jsonl"], [tmp_path / "one.jsonl"], tmp_path / "x")
