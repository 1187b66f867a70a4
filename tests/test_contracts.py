"""The shared contracts of align/core and base_model, each on its own: records, prompts, documents, atomic writes,
throughput, and sums over ranks (two real gloo processes)."""

import json
import os
import subprocess
import sys

import pytest

from align.core.metrics import Throughput
from align.core.records import ComparisonRecord, DataError, as_messages, iter_documents
from base_model.atomic import atomic_folder, write_jsonl_atomic, write_rows_atomic, write_text_atomic
from conftest import ROOT


def test_comparison_record_round_trips_and_keeps_what_a_writer_added():
    d = {
        "prompt": "2+2?",
        "responses": ["4", "5"],
        "ranking": [1, 2],
        "strength": 0.5,
        "tags": ["math"],
        "annotator": "a",
        "source": "human",
        "task_id": 7,
    }
    r = ComparisonRecord.parse(d, "x:1")
    assert r.prompt == [{"role": "user", "content": "2+2?"}] and r.extra == {"task_id": 7}
    assert ComparisonRecord.parse(r.to_dict(), "x:1") == r


def test_comparison_record_names_every_problem_with_its_place():
    bad = {"prompt": [{"role": "robot", "content": "hi"}], "responses": ["only"], "ranking": [0], "tags": "math"}
    problems = ComparisonRecord.problems(bad, "f.jsonl:3", ranked=True)
    assert [p.split(": ", 1)[1].split(" ")[1] for p in problems] == [
        "'prompt[0].role':",
        "'responses'",
        "'ranking'",
        "'tags'",
    ]
    assert all(p.startswith("f.jsonl:3: ") for p in problems)
    assert ComparisonRecord.problems({"prompt": "p", "responses": ["a", "b"]}, "t", ranked=False) == []
    assert ComparisonRecord.problems({"prompt": "p", "responses": ["a", "b"], "tags": ["x"]}, "t", False, {"y"}) == [
        "t: unknown tag(s) 'x'"
    ]
    with pytest.raises(DataError, match="f:1: field 'ranking'"):
        ComparisonRecord.parse({"prompt": "p", "responses": ["a", "b"]}, "f:1")


def test_as_messages_turns_text_into_a_user_turn_and_checks_lists():
    assert as_messages("hi", "w") == [{"role": "user", "content": "hi"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert as_messages(msgs, "w") is msgs
    for bad in ([], None, [{"role": "user"}], [{"role": "judge", "content": "x"}]):
        with pytest.raises(DataError, match="w: field 'prompt"):
            as_messages(bad, "w")


def test_iter_documents_names_the_line_of_a_missing_text(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\n{"body": "two"}\n')
    it = iter_documents([f], "text")
    assert next(it)[1:] == ({"text": "one"}, "one")
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'text' is missing"):
        next(it)


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.jsonl"
    write_text_atomic(target, "old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(target, rows())
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert write_rows_atomic(tmp_path / "t.parquet", [{"a": i} for i in range(2500)]) == 2500
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "t.parquet").num_rows == 2500


def test_atomic_folder_replaces_a_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "packed"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), atomic_folder(target) as tmp:
        (tmp / "b").write_text("2")
        raise ValueError("stop")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_folder(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"] and len(list(tmp_path.iterdir())) == 1


def test_throughput_counts_tokens_of_all_ranks_against_each_devices_peak():
    t = Throughput(flops_per_token=6e6, peak_tflops=1.0, world_size=4)
    out = t(real_tokens=8000, seconds=2.0)
    assert out["tokens_per_s"] == 4000
    assert out["mfu"] == pytest.approx(4000 * 6e6 / 4e12)
    assert t(8000, 2.0, flops=4.8e10)["mfu"] == pytest.approx(4.8e10 / 2.0 / 4e12)


SUMS_OVER_RANKS = """
import json, sys, torch
from align.core import distributed
from ppo.losses import masked_moments, masked_whiten
distributed.init()
r = distributed.rank()
sums = distributed.all_reduce_sums({"tokens": torch.tensor(3.0 + r), "rows": 1})
x = torch.tensor([[1.0, 2.0, 9.0]]) + 10 * r
mask = torch.tensor([[1.0, 1.0, 0.0]])
n, mean, var = masked_moments(x, mask, distributed.all_reduce)
w = masked_whiten(x, mask, all_reduce=distributed.all_reduce)
row = {"rank": r, "sums": sums, "n": n.item(), "mean": mean.item(), "var": var.item(), "w": w.tolist()}
with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:  # one file per rank: their stdout lines interleave
    json.dump(row, f)
import atexit
atexit.register(lambda: open(f"{sys.argv[1]}/rank{r}.atexit", "w").write(str(distributed.world_size())))
print(f"rank {r} left", end="")  # unflushed until it leaves
sys.exit(distributed.leave(0))
"""


@pytest.mark.slow
def test_sums_and_whitening_over_two_ranks_equal_those_of_all_values(tmp_path):
    script = tmp_path / "sums.py"
    script.write_text(SUMS_OVER_RANKS)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # each rank left through `distributed.leave`: the exit handlers ran (this one before ours took the group down)
    # and the output was flushed
    assert [(tmp_path / f"rank{r}.atexit").read_text() for r in range(2)] == ["2", "2"]
    assert "rank 0 left" in out.stdout and "rank 1 left" in out.stdout
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    values = [1.0, 2.0, 11.0, 12.0]  # the masked values of both ranks
    mean = sum(values) / 4
    var = sum((v - mean) ** 2 for v in values) / 3
    for row in rows:
        assert row["sums"] == {"rows": 2.0, "tokens": 7.0}
        assert row["n"] == 4 and row["mean"] == pytest.approx(mean) and row["var"] == pytest.approx(var)
        x = [v + 10 * row["rank"] for v in (1.0, 2.0)]
        assert row["w"][0][:2] == pytest.approx([(v - mean) / var**0.5 for v in x], rel=1e-5)
        assert row["w"][0][2] == 0.0


def test_a_rank_of_a_multi_rank_run_leaves_with_its_exit_status_after_the_exit_handlers(monkeypatch):
    import atexit

    from align.core import distributed

    class Left(Exception):
        pass

    def exit_now(code):
        raise Left(code)

    calls = []
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("exit handlers"))
    monkeypatch.setattr(distributed.os, "_exit", exit_now)
    assert distributed.leave(2) == 2 and calls == []  # no group (or a group of one): the interpreter's own exit
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.torch_dist, "get_world_size", lambda: 2)
    for code in (0, 2):
        with pytest.raises(Left) as left:
            distributed.leave(code)
        assert left.value.args == (code,)
    assert calls == ["exit handlers"] * 2


def test_stored_prompts_are_shown_without_being_checked_again():
    legacy = [{"content": "written before roles were checked"}]
    assert as_messages(legacy, "task 3", check=False) is legacy
    with pytest.raises(DataError):
        as_messages(legacy, "task 3")


def test_appended_rows_leave_out_a_line_cut_short_and_name_a_bad_one(tmp_path):
    """A run stopped in the middle of appending a row leaves a last line without its newline: readers leave it
    out, a resumed run cuts it (so its own rows start on a line of their own), and a metrics file it truncates on
    resume reads as before. A bad line elsewhere is an error naming the file and line."""
    from align.core.metrics import MetricsLogger, read_metrics
    from align.core.records import read_appended_rows

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert path.read_text().endswith('"lo')  # reading alone changes nothing
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.truncate_after(1)  # a resume from step 1
    logger.log(2, {"loss": 1.4})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 2.0), (2, 1.4)]

    results = tmp_path / "results.jsonl"
    results.write_text('{"id": "a"}\n{"id": "b"}')  # whole, only its newline missing
    assert read_appended_rows(results, repair=True) == [{"id": "a"}, {"id": "b"}]
    assert results.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    results.write_text('{"id": "a"}\n{"id": "b", "sc')
    assert read_appended_rows(results, repair=True) == [{"id": "a"}]
    assert results.read_text() == '{"id": "a"}\n'
    results.write_text('{"id": "a"}\n{oops\n{"id": "c"}\n')
    with pytest.raises(DataError, match="results.jsonl:2: not valid JSON"):
        read_appended_rows(results)


def test_deepspeed_starts_without_building_its_cpu_shared_memory_all_reduce():
    """DeepSpeed's CPU backend would compile a C++ shared-memory all-reduce at its first start on a machine (half a
    minute or more) for inference only: a training engine starts without loading it."""
    script = """
import sys, torch
sys.path.insert(0, "tests")
from deepspeed.accelerator import get_accelerator
builder = type(get_accelerator().create_op_builder("ShareMemCommBuilder"))
def refuse(self, *a, **k):
    raise SystemExit("the shared-memory all-reduce was built")
builder.load = refuse
from align.core.engine import TrainEngine
from align.core.sections import DeepSpeedSection, OptimConfig
from base_model import QwenForCausalLM
from conftest import tiny_config
engine = TrainEngine(QwenForCausalLM(tiny_config(), seed=0), OptimConfig(lr=1e-3), DeepSpeedSection(), 1)
ids = torch.randint(0, 300, (2, 8))
engine.backward(engine.forward(ids, labels=ids).loss_sum)
print("stepped", engine.step() is not None)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "stepped True" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
