"""`align bench [SUITE …] [--json OUT]`: our code side by side with what users would otherwise pick.

Each suite runs ours and the peer on the same machine, weights, data, dtype and thread count, alternating, for
several repetitions, and reports medians and the ratio ours / peer (higher is better for rates). Rows:
`{"suite", "metric", "ours", "peer", "ratio", "unit"}`; `peer` and `ratio` are null where nothing comparable
exists (for example the machine's own matmul peak).

Suites: peak, model, generate, sft (against TRL's SFTTrainer), ppo, tags, label (the labelling API under load),
taxonomy (`align tags build` on a million queries; minutes, so not in the default run).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SUITES = ("peak", "model", "generate", "sft", "ppo", "tags", "label", "taxonomy")
DEFAULT_SUITES = SUITES[:-1]


def _median_time(fn: Callable[[], None], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _alternate(
    ours: Callable[[], None], peer: Callable[[], None], reps: int, best: bool = False
) -> tuple[float, float]:
    """Median (or best) seconds of each, measured alternately so drifts in machine load hit both."""
    ours(), peer()  # warm-up
    t_ours, t_peer = [], []
    for _ in range(reps):
        for fn, acc in ((ours, t_ours), (peer, t_peer)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    pick = min if best else statistics.median
    return pick(t_ours), pick(t_peer)


def profile_table(fn: Callable[[], None], title: str, rows: int = 25) -> str:
    """One call of `fn` under torch's profiler: the operations that took the most device time (CPU time where
    there is no GPU), and on a GPU how many kernels ran. Printed beside a suite's figures, it says where the time
    goes without a second run."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows, max_name_column_width=60
    )
    kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    return f"[profile] {title}" + (f": {kernels} kernels" if cuda else "") + "\n" + table


def phase_split(engine, step: Callable[[], object]) -> dict[str, float]:
    """Milliseconds of one training step spent in the engine's forward, backward and optimizer step, and the rest:
    the host's work between them (batches, collation, synchronisations). On a GPU on its clock (CUDA events around
    each call, so queued kernels count where they run)."""
    cuda = torch.cuda.is_available()

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(start, end) -> float:
        return start.elapsed_time(end) if cuda else (end - start) * 1e3

    spans: list[tuple[str, object, object]] = []

    def timed(name: str, call: Callable) -> Callable:
        def run(*args, **kwargs):
            start = mark()
            out = call(*args, **kwargs)
            spans.append((name, start, mark()))
            return out

        return run

    phases = ("forward", "backward", "step")
    for name in phases:
        setattr(engine, name, timed(name, getattr(engine, name)))  # on the instance: the class is untouched
    try:
        first = mark()
        step()
        last = mark()
        if cuda:
            torch.cuda.synchronize()
    finally:
        for name in phases:
            delattr(engine, name)
    out = {name: sum(ms(s, e) for n, s, e in spans if n == name) for name in phases}
    out["other"] = ms(first, last) - sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def row(suite: str, metric: str, ours: float, peer: float | None, unit: str) -> dict:
    return {
        "suite": suite,
        "metric": metric,
        "ours": ours,
        "peer": peer,
        "ratio": (ours / peer) if peer else None,
        "unit": unit,
    }


def peak(device: str = "cpu", n: int = 2048, reps: int = 5) -> list[dict]:
    """Matmul FLOP/s in fp32 and bf16 (torch), the best of several repetitions (a peak, not a median); fp32
    against NumPy's BLAS as the peer."""

    out = []
    flops = 2 * n**3
    a32, b32 = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    an, bn = a32.cpu().numpy(), b32.cpu().numpy()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t_ours, t_peer = _alternate(lambda: (a32 @ b32, sync()), lambda: an @ bn, reps, best=True)
    out.append(row("peak", "matmul_fp32", flops / t_ours / 1e12, flops / t_peer / 1e12, "TFLOP/s"))
    a16, b16 = a32[:512, :512].bfloat16(), b32[:512, :512].bfloat16()  # small: slow where bf16 is emulated
    t16 = _median_time(lambda: (a16 @ b16, sync()), 3)
    flops16 = 2 * 512**3
    out.append(row("peak", "matmul_bf16", flops16 / t16 / 1e12, None, "TFLOP/s"))
    return out


def _bench_config(hidden: int, layers: int, heads: int, vocab: int, ffn: int):
    from base_model import QwenConfig

    return QwenConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        seq_length=4096,
        max_position_embeddings=4096,
    )


def _pair(config, dtype):
    """Our model and transformers' Qwen2ForCausalLM with the same weights."""
    import transformers

    from base_model import QwenForCausalLM
    from base_model.checkpoint import config_to_hf

    torch.manual_seed(0)
    ours = QwenForCausalLM(config)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config_to_hf(config, torch.float32)))
    hf.load_state_dict(ours.state_dict())
    hf.config._attn_implementation = "sdpa"
    return ours.to(dtype), hf.to(dtype)


def model(device: str = "cpu", reps: int = 3, peak_rows: list[dict] | None = None) -> list[dict]:
    """Forward + backward tokens/s of a ~100M-parameter config, fp32 and bf16, and model-FLOPs utilisation."""
    config = _bench_config(hidden=768, layers=12, heads=12, vocab=32000, ffn=2048)
    batch, seq = 4, 256
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    # the machine's peak is the faster of torch's and NumPy's matmul
    peaks = {r["metric"]: max(r["ours"], r["peer"] or 0.0) for r in (peak_rows or peak(device))}
    out = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if name == "bf16" and peaks["matmul_bf16"] < 0.25 * peaks["matmul_fp32"]:
            note = (
                f"not run: this machine's bf16 matmul reaches {peaks['matmul_bf16']:.4f} TFLOP/s against "
                f"{peaks['matmul_fp32']:.4f} in fp32 (no native bf16 arithmetic); a step would take minutes"
            )
            out.append({**row("model", "fwd_bwd_tokens_per_s_bf16", float("nan"), None, "tokens/s"), "note": note})
            print(f"model    bf16: {note}", flush=True)
            continue
        ours, hf = (m.to(device).train() for m in _pair(config, dtype))

        def step(m):
            def run():
                m.zero_grad(set_to_none=True)
                m(ids).logits.float().logsumexp(-1).mean().backward()

            return run

        t_ours, t_peer = _alternate(step(ours), step(hf), reps)
        tokens = batch * seq
        out.append(row("model", f"fwd_bwd_tokens_per_s_{name}", tokens / t_ours, tokens / t_peer, "tokens/s"))
        mfu = tokens / t_ours * config.flops_per_token(seq) / (peaks[f"matmul_{name}"] * 1e12)
        mfu_peer = tokens / t_peer * config.flops_per_token(seq) / (peaks[f"matmul_{name}"] * 1e12)
        out.append(row("model", f"mfu_{name}", mfu, mfu_peer, "fraction of measured matmul peak"))
    out.append(row("model", "parameters", float(config.num_parameters()), None, "count"))
    return out


def generate(device: str = "cpu", reps: int = 2, batch: int = 32, new_tokens: int = 128) -> list[dict]:
    """The native rollout engine against transformers' generate, sampling, same weights, tokens/s."""
    from base_model.generate import SamplingParams
    from base_model.generate import generate as ours_generate

    config = _bench_config(hidden=512, layers=8, heads=8, vocab=32000, ffn=1408)
    ours, hf = (m.to(device).eval() for m in _pair(config, torch.float32))
    prompts = torch.randint(0, config.vocab_size, (batch, 32), device=device)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=0.9, seed=0)

    def run_ours():
        ours_generate(ours, prompts.tolist(), sampling)

    def run_peer():
        hf_sample(hf, prompts, new_tokens)

    t_ours, t_peer = _alternate(run_ours, run_peer, reps)
    tokens = batch * new_tokens
    return [row("generate", "sampling_tokens_per_s", tokens / t_ours, tokens / t_peer, "tokens/s")]


@torch.no_grad()
def hf_sample(hf, prompts: torch.Tensor, new_tokens: int) -> None:
    """transformers' `generate` at the settings of the generate suites: top-p 0.9, exactly `new_tokens` tokens."""
    hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        top_p=0.9,
        temperature=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )


def tags(reps: int = 3) -> list[dict]:
    """Balanced sampling of 50,000 from 1,000,000 prompts over 6,600 Zipf tags; MinHash dedup documents/s against
    datasketch's in-memory MinHashLSH."""
    import random
    import tempfile

    from align.core.records import write_jsonl_atomic
    from align.world.corpus import documents
    from base_model.pretrain.dedup import dedup, shingles
    from rm.tags.sampler import sample, zipf_pool

    pool = zipf_pool(1_000_000, 6600, seed=0)
    out = []
    for method in ("complexity-first", "capped"):
        t = _median_time(lambda: sample(pool, 50_000, method, seed=0), reps, warmup=0)
        out.append(row("tags", f"sample_1M_{method}_seconds", t, None, "s"))
    docs = documents(4000, seed=1, sentences=(10, 20))
    rng = random.Random(0)
    docs += [dict(d, id=d["id"] + "-copy") for d in rng.sample(docs, 400)]
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl_atomic(Path(tmp) / "in.jsonl", docs)

        def run_ours():
            dedup([Path(tmp) / "in.jsonl"], Path(tmp) / "out.jsonl", 0.8)

        def run_peer():
            from datasketch import MinHash, MinHashLSH

            lsh = MinHashLSH(threshold=0.8, num_perm=128)
            for i, d in enumerate(docs):
                m = MinHash(num_perm=128, seed=1)
                m.update_batch(list(shingles(d["text"])))
                if not lsh.query(m):
                    lsh.insert(str(i), m)

        t_ours, t_peer = _alternate(run_ours, run_peer, reps)
    out.append(row("tags", "dedup_documents_per_s", len(docs) / t_ours, len(docs) / t_peer, "documents/s"))
    return out


def taxonomy(prompts: int = 1_000_000, concepts: int = 6600, rare: int = 4000) -> list[dict]:
    """`align tags build --hierarchy --safety` as a user runs it, on a million queries' raw tags (about 30,000
    distinct: planted concepts in several spellings and a paraphrase, and rare tags; `align/world/tag_corpus.py`),
    cold and then with the embeddings cached; and how many planted concepts came out as one tag each. No peer: no
    other tool builds an InsTag taxonomy."""
    import subprocess
    import sys
    import tempfile
    from collections import Counter

    from align.core.records import write_jsonl_atomic
    from align.world.tag_corpus import raw_tag_corpus, spellings

    raw, planted = raw_tag_corpus(prompts, concepts, rare, seed=0)
    distinct = len(Counter(t for r in raw for t in r))
    out = [row("taxonomy", "raw_tags_distinct", distinct, None, "tags")]
    safety = Path(__file__).resolve().parent.parent / "configs" / "taxonomy" / "safety-pku.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl_atomic(Path(tmp) / "raw.jsonl", [{"tags": r} for r in raw])
        del raw
        for run_name in ("cold", "cached"):
            cmd = [sys.executable, "-m", "align.cli", "tags", "build", "--input", str(Path(tmp) / "raw.jsonl"),
                   "--out", str(Path(tmp) / "tax"), "--hierarchy", "--safety", str(safety)]  # fmt: skip
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"align tags build failed: {done.stderr[-2000:]}")
            print("\n".join(l for l in done.stdout.splitlines() if l.startswith("[tags build]")), flush=True)
            out.append(row("taxonomy", f"build_1M_{run_name}_seconds", seconds, None, "s"))
        mapping = json.loads((Path(tmp) / "tax" / "mapping.json").read_text())
        leaves = len(set(mapping.values()))
        whole = 0
        for a, b in planted:
            names = {mapping.get(t) for t in [*spellings(a, b), f"{b} of {a}"]} - {None}
            whole += len(names) == 1
    out.append(row("taxonomy", "tags_built", leaves, None, "tags"))
    out.append(row("taxonomy", "planted_concepts_as_one_tag", whole / len(planted), None, "fraction"))
    return out


def ppo(reps: int = 1) -> list[dict]:
    """Seconds per PPO iteration of the tiny recipe, split into rollout, experience and training."""
    import subprocess
    import sys
    import tempfile

    from align.core.distributed import subprocess_env
    from align.core.metrics import read_metrics
    from align.core.records import write_jsonl_atomic
    from align.world import ppo_task

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_jsonl_atomic(d / "sft.jsonl", ppo_task.sft_conversations(100, 0))
        write_jsonl_atomic(d / "rm.jsonl", ppo_task.enthusiasm_comparisons(100, 0))
        run = lambda *a: subprocess.run(
            [sys.executable, "-m", "align.cli", *a], cwd=root, check=True, capture_output=True, env=subprocess_env()
        )
        run(
            "sft",
            "configs/sft/tiny.yaml",
            f"data.train={d / 'sft.jsonl'}",
            "train.max_steps=5",
            "train.save_every=0",
            f"out_dir={d / 'sft'}",
        )
        run(
            "rm",
            "train",
            "configs/rm/tiny.yaml",
            f"data.train={d / 'rm.jsonl'}",
            "train.max_steps=5",
            f"out_dir={d / 'rm'}",
        )
        run(
            "ppo",
            "configs/ppo/tiny.yaml",
            f"models.policy={d / 'sft' / 'final'}",
            f"models.reward={d / 'rm' / 'final'}",
            "data.ptx=null",
            "ppo.iterations=6",
            "train.eval_every=0",
            "train.save_every=0",
            f"out_dir={d / 'ppo'}",
        )
        rows = [r for r in read_metrics(d / "ppo") if "train/time/rollout_s" in r][1:]  # the first includes warm-up
    med = lambda k: statistics.median(r[k] for r in rows)
    return [
        row("ppo", "rollout_seconds", med("train/time/rollout_s"), None, "s/iteration"),
        row("ppo", "experience_seconds", med("train/time/experience_s"), None, "s/iteration"),
        row("ppo", "train_seconds", med("train/time/train_s"), None, "s/iteration"),
        row("ppo", "rollout_tokens_per_s", med("train/rollout_tokens_per_s"), None, "tokens/s"),
    ]


def sft(reps: int = 2, n_examples: int = 400, max_len: int = 512, batch: int = 4) -> list[dict]:
    """`align sft` (packed rows, DeepSpeed ZeRO-0) against TRL's SFTTrainer (padding-free packing), one epoch over
    the same conversations, same weights, fp32, same rows per step; tokens/s = dataset tokens / training seconds
    (setup excluded on both sides)."""
    import subprocess
    import sys
    import tempfile

    from align.core.chatml import render
    from align.core.distributed import subprocess_env
    from align.core.records import write_jsonl_atomic
    from align.world import demo as world
    from base_model import QwenTokenizer, save_pretrained
    from sft import train as sft_train

    config = _bench_config(hidden=384, layers=6, heads=6, vocab=512, ffn=1024)
    tok = QwenTokenizer.load("bytes")
    conversations = [{"messages": c["messages"]} for c in world.sft_conversations(n_examples, seed=0)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ours_model, _ = _pair(config, torch.float32)
        save_pretrained(ours_model, d / "init", tokenizer=tok)
        write_jsonl_atomic(d / "data.jsonl", conversations)

        def run_ours():
            cfg = sft_train.SFTConfig.model_validate(
                {
                    "model": {"init": str(d / "init")},
                    "data": {"train": str(d / "data.jsonl"), "max_len": max_len, "packing": True},
                    "optim": {"lr": 1e-4, "schedule": "constant", "weight_decay": 0.0},
                    "train": {"micro_batch_size": batch, "epochs": 1, "log_every": 1000, "save_every": 0},
                    "out_dir": str(d / f"ours-{time.time_ns()}"),
                }
            )
            run = sft_train.setup(cfg)
            run.engine.train()
            t0 = time.perf_counter()
            for step in range(run.total_steps):  # the training steps alone, as trainer.train() below
                sft_train.train_step(run, step)
            return time.perf_counter() - t0

        def run_peer():  # in a fresh process: in this one the Trainer would see our process group and add DDP
            code = f"from align.bench import trl_sft_seconds; print(trl_sft_seconds({str(d)!r}, {batch}, {max_len}))"
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                env=subprocess_env(),
                cwd=Path(__file__).resolve().parent.parent,
            )
            if done.returncode:
                raise RuntimeError(f"TRL SFTTrainer run failed:\n{done.stderr[-3000:]}")
            return float(done.stdout.strip().splitlines()[-1])

        tokens = sum(len(render(c["messages"], tok)) for c in conversations)  # ChatML, as both trainers see it
        run_ours(), run_peer()  # warm-up
        t_ours, t_peer = [], []
        for _ in range(reps):
            t_ours.append(run_ours())
            t_peer.append(run_peer())
    return [
        row(
            "sft",
            "train_tokens_per_s",
            tokens / statistics.median(t_ours),
            tokens / statistics.median(t_peer),
            "tokens/s",
        )
    ]


def trl_sft_seconds(folder: str, batch: int, max_len: int) -> float:
    """Seconds of TRL's SFTTrainer.train() over `folder`/data.jsonl from the weights in `folder`/init (the peer of
    the sft suite, run in a process of its own)."""
    import datasets
    import transformers
    import trl

    from align.core.records import iter_records

    d = Path(folder)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(d / "init")
    data = datasets.Dataset.from_list([r for _, r in iter_records(d / "data.jsonl")])
    model = transformers.Qwen2ForCausalLM.from_pretrained(d / "init", dtype=torch.float32, attn_implementation="sdpa")
    args = trl.SFTConfig(
        output_dir=str(d / "trl"),
        per_device_train_batch_size=batch,
        max_length=max_len,
        packing=True,
        padding_free=True,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )  # TRL turns it on by default; ours is off
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=hf_tok)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


GPU_SUITES = ("peak", "model", "generate", "sft", "ppo")  # with --device cuda: align.bench_gpu's shapes


def run(suites: list[str], device: str = "cpu", json_out: str | None = None) -> list[dict]:
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        from align.core.config import ConfigError

        raise ConfigError(f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(SUITES)}")
    _check_device(device)
    rows: list[dict] = []
    peak_rows = None
    for suite in suites or list(DEFAULT_SUITES):
        t0 = time.perf_counter()
        if device.startswith("cuda") and suite in GPU_SUITES:
            from align import bench_gpu

            new = bench_gpu.run_suite(suite, peak_rows[0]["ours"] if peak_rows else None)
            peak_rows = new if suite == "peak" else peak_rows
        elif suite == "peak" or (suite == "model" and peak_rows is None):
            peak_rows = peak(device)
            new = peak_rows if suite == "peak" else model(device, peak_rows=peak_rows)
        elif suite == "model":
            new = model(device, peak_rows=peak_rows)
        elif suite == "generate":
            new = generate(device)
        else:
            from align.bench_label import label

            new = {"tags": tags, "sft": sft, "label": label, "ppo": ppo, "taxonomy": taxonomy}[suite]()
        rows += new
        _print(suite, new, t0)
        if json_out:  # after every suite: a run stopped at a time limit keeps what it measured
            clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
            Path(json_out).write_text(json.dumps(clean, indent=2) + "\n")
    return rows


def _check_device(device: str) -> None:
    """A device this machine has, before any suite builds a model (a CUDA suite failed only after minutes)."""
    from align.core.config import ConfigError

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA device that torch {torch.__version__} can use")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: the suites run on cpu or cuda")


def _print(suite: str, new: list[dict], t0: float) -> None:
    for r in new:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        peer = f"{r['peer']:.4g}" if r["peer"] is not None else "-"
        print(f"{r['suite']:<9}{r['metric']:<40}{r['ours']:>12.4g}{peer:>12}{ratio:>9}  {r['unit']}", flush=True)
    print(f"  ({suite}: {time.perf_counter() - t0:.0f} s)", flush=True)
