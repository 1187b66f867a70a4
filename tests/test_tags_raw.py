"""Open-set tagging (InsTag's first step): answers in the shapes models give them — fenced, one object per line,
wrapped, single-quoted, with trailing commas, cut off mid-list, refused — are read into tags or counted as failures;
retries, resumption and the report; the offline keyphrase fallback; an endpoint and a checkpoint end to end."""

import json
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT, ChatServer, init_tiny_model, serve
from rm.tags.raw import TAG_PROMPT, keyphrase_tags, parse_tag_answer, raw_tags

ANSWERS = [json.loads(l) for l in (FIXTURES / "instag_answers.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", ANSWERS, ids=[a["answer"][:30] for a in ANSWERS])
def test_recorded_answers_are_read(case):
    assert [x["tag"] for x in parse_tag_answer(case["answer"])] == case["tags"]


class Tagger(ChatServer):
    """Answers with tags, except: refuses the first time it sees a question about cats (a retry then works), and
    always refuses questions about the moon."""

    seen: list = []

    def reply(self, body):
        query = body["messages"][-1]["content"]
        Tagger.seen.append((query, body.get("temperature")))
        if "moon" in query or ("cats" in query and sum("cats" in q for q, _ in Tagger.seen) == 1):
            text = "I cannot tag this."
        else:
            text = '```json\n[{"tag": "Question Answering", "explanation": "a question"}]\n```'
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_an_endpoint_with_retries_failures_and_resumption(tmp_path):
    Tagger.seen = []
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Why do cats purr?", "How far is the moon?",
                                                                           "What is 2+2?"]))  # fmt: skip
    gen = serve(Tagger)
    url = next(gen)
    from rm.tags.raw import endpoint_asker

    report = raw_tags(str(prompts), tmp_path / "raw.jsonl", ask_one=endpoint_asker(url), retries=2, batch_size=2)
    rows = {r["index"]: r for r in map(json.loads, (tmp_path / "raw.jsonl").read_text().splitlines())}
    assert rows[0]["tags"] == ["question answering"] and rows[0]["attempts"] == 2  # retried once, then tagged
    assert rows[1]["status"] == "failed" and rows[1]["attempts"] == 3 and "cannot" in rows[1]["last_answer"]
    assert report["tagged"] == 2 and report["failed"] == 1 and report["retried"] == 2
    assert report["failures"][0]["index"] == 1
    assert (TAG_PROMPT.format(query="Why do cats purr?"), 0.0) in Tagger.seen  # first asked greedily
    assert (TAG_PROMPT.format(query="Why do cats purr?"), 0.7) in Tagger.seen  # then sampled
    asked = len(Tagger.seen)
    raw_tags(str(prompts), tmp_path / "raw.jsonl", ask_one=endpoint_asker(url))  # resumed: nothing asked again
    assert len(Tagger.seen) == asked
    text = (tmp_path / "raw.jsonl").read_text()  # a run stopped while writing its last row leaves half of it
    (tmp_path / "raw.jsonl").write_text(text[: text.rindex("\n", 0, -1) + 30])
    report = raw_tags(str(prompts), tmp_path / "raw.jsonl", ask_one=endpoint_asker(url))
    assert len(Tagger.seen) == asked + 1 and report["tagged"] == 2 and report["failed"] == 1  # that prompt again
    rows = [json.loads(l) for l in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    next(gen, None)


def test_offline_keyphrases_and_the_build_that_follows(tmp_path):
    prompts = ["How do I sort a list in Python quickly?", "Sort a Python dictionary by value.",
               "Translate this sentence into French: good morning.", "Translate the word cat into French."]  # fmt: skip
    tags = keyphrase_tags(prompts)
    assert all(1 <= len(t) <= 3 for t in tags)
    assert any("python" in x["tag"] for x in tags[0]) and any("french" in x["tag"] for x in tags[2])
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in prompts))
    out = subprocess.run([sys.executable, "-m", "align.cli", "tags", "raw", "--input", str(path), "--out",
                          str(tmp_path / "raw.jsonl"), "--offline"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "raw.jsonl.report.json").read_text())["tagged"] == 4
    build = subprocess.run([sys.executable, "-m", "align.cli", "tags", "build", "--input", str(tmp_path / "raw.jsonl"),
                            "--out", str(tmp_path / "tax"), "--alpha", "1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    assert (tmp_path / "tax" / "taxonomy.yaml").exists()


@pytest.mark.slow
def test_a_checkpoint_tags_end_to_end(tmp_path):
    init_tiny_model(tmp_path / "m")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "align.cli", "tags", "raw", "--input", str(path), "--out",
                          str(tmp_path / "raw.jsonl"), "--model", str(tmp_path / "m"), "--retries", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "raw.jsonl.report.json").read_text())
    assert report["tagged"] + report["failed"] == 1 and report["source"] == "checkpoint"
