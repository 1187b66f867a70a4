"""Pretraining data: dedup, decontamination, quality filter, packing, vocabulary extension."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from align.core.records import DataError, write_jsonl_atomic
from align.world.corpus import documents
from base_model import QwenTokenizer
from base_model.pretrain.decontam import decontaminate
from base_model.pretrain.dedup import dedup
from base_model.pretrain.packing import PackedDataset, pack, positions_and_labels
from base_model.pretrain.quality import QualityRules, filter_documents, rule_scores
from base_model.pretrain.vocab import extend_ranks
from base_model.tokenizer import cl100k_base_ranks
from conftest import ROOT


def planted_corpus(n, seed=0):
    """Documents in English and Chinese, about 20% followed by a near copy (one word or character changed)."""
    rng = random.Random(seed)
    out, planted = [], set()
    for d in documents(n, seed=seed + 3, sentences=(15, 25)):
        out.append(d)
        if rng.random() < 0.2:
            units = d["text"].split(" ") if d["lang"] == "en" else list(d["text"])
            units[rng.randrange(len(units))] = "XYZ" if d["lang"] == "en" else "鸟"
            planted.add(len(out))
            out.append(
                {"id": d["id"] + "-near", "text": (" " if d["lang"] == "en" else "").join(units), "lang": d["lang"]}
            )
    return out, planted


def test_dedup_precision_and_recall_on_planted_duplicates(tmp_path):
    docs, planted = planted_corpus(600)
    docs.append(dict(docs[0]))  # one exact duplicate too
    planted.add(len(docs) - 1)
    write_jsonl_atomic(tmp_path / "in.jsonl", docs)
    report = dedup([tmp_path / "in.jsonl"], tmp_path / "out.jsonl", 0.8, report_path=tmp_path / "report.jsonl")
    dropped = {d for c in report.clusters for d in c["dropped"]}
    tp = len(dropped & planted)
    assert tp / len(dropped) >= 0.95 and tp / len(planted) >= 0.95
    assert {d["lang"] for i, d in enumerate(docs) if i in dropped} == {"en", "zh"}
    assert report.exact_dropped == 1
    kept = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(kept) == len(docs) - len(dropped)
    clusters = [json.loads(l) for l in (tmp_path / "report.jsonl").read_text().splitlines()[1:]]
    assert all("kept" in c and c["why"] for c in clusters)


def test_dedup_reads_and_writes_parquet(tmp_path):
    import pandas as pd

    docs, planted = planted_corpus(100, seed=4)
    pd.DataFrame(docs).to_parquet(tmp_path / "in.parquet")
    report = dedup([tmp_path / "in.parquet"], tmp_path / "out.parquet", 0.8)
    kept = pd.read_parquet(tmp_path / "out.parquet")
    assert len(kept) == len(docs) - report.exact_dropped - report.near_dropped
    assert report.near_dropped >= 0.95 * len(planted)


MEASURE = """
import resource, sys
from base_model.pretrain.dedup import dedup
dedup([sys.argv[1]], sys.argv[2], 0.8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_dedup_memory_stays_bounded_when_the_corpus_grows(tmp_path):
    peaks = []
    for n in (500, 5000):
        docs, _ = planted_corpus(n, seed=n)
        write_jsonl_atomic(tmp_path / f"in{n}.jsonl", docs)
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(tmp_path / f"in{n}.jsonl"), str(tmp_path / "o.jsonl")],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            check=True,
        )
        peaks.append(int(out.stdout.strip().splitlines()[-1]))
    assert peaks[1] <= 1.5 * peaks[0], peaks


def test_decontamination_drops_exactly_the_planted_documents(tmp_path):
    eval_items = [
        {
            "question": "What is the boiling point of water at sea level in degrees Celsius, assuming "
            "standard atmospheric pressure and pure water?"
        },
        {"question": "请问在标准大气压下纯水的沸点是多少摄氏度呢这是一个常见的问题"},
    ]
    write_jsonl_atomic(tmp_path / "eval.jsonl", eval_items)
    docs = documents(200, seed=1)
    en_gram = "the boiling point of water at sea level in degrees celsius assuming standard atmospheric"  # 13 words
    zh_gram = "标准大气压下纯水的沸点是多少摄"  # 13 characters
    planted = {5: f"Intro. {en_gram.upper()}! More text.", 17: f"开头。{zh_gram}结尾。"}
    near_miss = "the boiling point of water at sea level in degrees celsius assuming"  # 11 words only
    for i, text in planted.items():
        docs[i]["text"] = text
    docs[9]["text"] = near_miss
    write_jsonl_atomic(tmp_path / "train.jsonl", docs)
    report = decontaminate([tmp_path / "train.jsonl"], tmp_path / "clean.jsonl", [tmp_path / "eval.jsonl"], n=13)
    assert sorted(int(m["document"].rsplit(":", 1)[1]) - 1 for m in report["matches"]) == [5, 17]
    assert [m["matched"].endswith(":1") for m in report["matches"]] == [True, False]
    assert report["kept"] == 198


def test_quality_rules_and_reasons(tmp_path):
    good = (
        "The old harbour town wakes slowly. Fishermen haul their nets onto the stone quay while gulls circle "
        "above, and the baker on the corner opens his shutters to the smell of fresh bread. By noon the market "
        "square is crowded with visitors who have come to see the festival, and children chase each other "
        "between the stalls. In the evening a brass band plays near the lighthouse and that is when most of the "
        "town gathers with friends to watch the boats return."
    )
    docs = [
        {"text": good},
        {"text": "short text"},
        {"text": ("the spam and the ham with the eggs " * 30)},
        {"text": good + " buy cheap pills"},
        {"text": "1234 5678 9012 " * 30},
    ]
    write_jsonl_atomic(tmp_path / "in.jsonl", docs)
    rules = QualityRules(min_words=20, banned_words=["cheap pills"])
    counts = filter_documents([tmp_path / "in.jsonl"], tmp_path / "out.jsonl", rules, rejected=tmp_path / "rej.jsonl")
    assert counts["kept"] == 1
    rejected = [json.loads(l)["quality"]["dropped_by"] for l in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert rejected == ["too_short", "top_2gram_chars", "banned_words", "digit_ratio"]
    kept = json.loads((tmp_path / "out.jsonl").read_text())
    assert kept["quality"]["dropped_by"] is None and "stop_words" in kept["quality"]["scores"]
    assert rule_scores("猫" * 100, rules)["cjk"] == 1.0


def test_perplexity_score_with_a_reference_model(tmp_path):
    import torch

    from base_model import QwenForCausalLM, save_pretrained
    from conftest import tiny_config

    tok = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    save_pretrained(QwenForCausalLM(tiny_config(vocab_size=512, initializer_range=0.02)), tmp_path / "ref", tok)
    write_jsonl_atomic(tmp_path / "in.jsonl", [{"text": "The cat and the dog sat with the bird near the river."}])
    filter_documents(
        [tmp_path / "in.jsonl"],
        tmp_path / "out.jsonl",
        QualityRules(min_words=1, min_stop_words=0),
        model_dir=tmp_path / "ref",
        rejected=tmp_path / "rej.jsonl",
    )
    rows = (tmp_path / "out.jsonl").read_text() + (tmp_path / "rej.jsonl").read_text()
    ppl = json.loads(rows.splitlines()[0])["quality"]["scores"]["perplexity"]
    assert 300 < ppl < 800  # an untrained model with small weights is close to uniform over 512 ids


def test_perplexities_over_batches_equal_one_text_at_a_time(tmp_path):
    """The filter scores documents several at a time (right-padded, in chunks); each score equals the one-text
    computation, also for texts past the model's trained length (dynamic NTK and LogN on), which go alone."""
    import math

    import torch

    from base_model import QwenForCausalLM, save_pretrained
    from conftest import tiny_config

    tok = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=512, seq_length=24, use_dynamic_ntk=True, use_logn_attn=True)
    model = QwenForCausalLM(config).eval()
    save_pretrained(model, tmp_path / "ref", tok)
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcde fgh") for _ in range(rng.randint(0, 60))) for _ in range(23)]
    write_jsonl_atomic(tmp_path / "in.jsonl", [{"text": t, "i": i} for i, t in enumerate(texts)])
    seen = []
    filter_documents([tmp_path / "in.jsonl"], tmp_path / "out.jsonl", QualityRules(min_words=0, min_stop_words=0,
                     min_mean_word_length=0, max_mean_word_length=1000, min_alpha_words=0.0),
                     model_dir=tmp_path / "ref", rejected=tmp_path / "rej.jsonl", progress=seen.append,
                     chunk=5)  # fmt: skip
    assert seen == [5, 5, 5, 5, 3]
    rows = [json.loads(l) for p in ("out", "rej") for l in (tmp_path / f"{p}.jsonl").read_text().splitlines()]
    got = {r["i"]: r["quality"]["scores"]["perplexity"] for r in rows}
    assert len(got) == 23 and any(len(tok.encode(t)) > 24 for t in texts)
    for i, text in enumerate(texts):
        ids = tok.encode(text)[:1024]
        if len(ids) < 2:
            assert got[i] == float("inf")
            continue
        with torch.no_grad():
            x = torch.tensor([ids])
            nll = -model(x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None]).mean().item()
        assert got[i] == pytest.approx(math.exp(nll), rel=1e-5), (i, len(ids))


def test_malformed_input_names_file_and_line_and_leaves_no_output(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text' is missing or not a string"):
        dedup([tmp_path / "bad.jsonl"], tmp_path / "out.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        decontaminate([tmp_path / "bad.jsonl"], tmp_path / "out2.jsonl", [tmp_path / "bad.jsonl"], n=1)
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        filter_documents([tmp_path / "broken.jsonl"], tmp_path / "out3.jsonl", QualityRules())
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        pack([tmp_path / "empty.jsonl"], tmp_path / "packed", QwenTokenizer.from_bytes(), 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "broken.jsonl", "empty.jsonl"]


def test_packing_round_trip_and_document_boundaries(tmp_path):
    tok = QwenTokenizer.from_bytes()
    write_jsonl_atomic(tmp_path / "d.jsonl", [{"text": "abc"}, {"text": "defgh"}, {"text": "ij"}])
    index = pack([tmp_path / "d.jsonl"], tmp_path / "p", tok, seq_len=8)
    assert (index["n_docs"], index["n_tokens"], index["n_rows"]) == (3, 13, 2)
    ds = PackedDataset(tmp_path / "p")
    eod = tok.eod_id
    assert ds.row(0)["input_ids"].tolist() == [97, 98, 99, eod, 100, 101, 102, 103]
    assert ds.row(0)["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert ds.row(0)["labels"].tolist() == [-100, 98, 99, eod, -100, 101, 102, 103]
    assert ds.row(1)["input_ids"].tolist() == [104, eod, 105, 106, eod, eod, eod, eod]
    positions, labels = positions_and_labels(np.array([104, eod, 105, 106, eod, eod, eod, eod]), eod)
    assert positions.tolist() == [0, 1, 0, 1, 2, 0, 0, 0]
    assert labels.tolist() == [-100, eod, -100, 106, eod, -100, -100, -100]


def test_extended_vocabulary_compresses_chinese_keeps_english_and_digits(tmp_path):
    corpus = [d["text"] for d in documents(3000, seed=5) if d["lang"] == "zh"]
    base = cl100k_base_ranks()
    ranks = extend_ranks(base, corpus, len(base) + 3000)
    a, b = QwenTokenizer(base), QwenTokenizer(ranks)
    held = documents(400, seed=99)
    zh = "".join(d["text"] for d in held if d["lang"] == "zh")
    en = " ".join(d["text"] for d in held if d["lang"] == "en")
    assert len(b.encode(zh)) <= 0.7 * len(a.encode(zh))
    assert abs(len(b.encode(en)) - len(a.encode(en))) <= 0.01 * len(a.encode(en))
    for text in (zh, en, "数字 1234567890 和 3.14159", "mixed 中文 English 42"):
        assert b.decode(b.encode(text)) == text
    assert all(len(b.decode([t]).strip()) <= 1 for t in b.encode("0123456789 98765") if b.decode([t]).strip().isdigit())
    from base_model.tokenizer import save_ranks

    save_ranks(ranks, tmp_path / "ext.tiktoken")
    assert QwenTokenizer.from_file(tmp_path / "ext.tiktoken").encode(zh) == b.encode(zh)
