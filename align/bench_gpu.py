"""`align bench --device cuda`: the suites at the shapes alignment researchers train on one GPU.

- model: bf16 forward + backward of the Qwen-1.8B shape (4 x 2048) and the 7B shape (2 x 2048), eager and with
  compiled layers, against transformers' Qwen2 (sdpa); MFU against the measured bf16 matmul peak.
- generate: the native engine (static cache, CUDA-graph decoding) against transformers' `generate`, 1.8B shape,
  bf16, batch 64, 128-token prompts, 256 new tokens, top-p 0.9.
- sft: `align sft`'s training step (ZeRO-2, bf16, packed rows of 2048, micro-batch 4, cl100k_base; 1 and 8
  micro-batches per optimizer step) against the bare model's forward + backward on the same rows: the trainer's
  share of the model's speed.
- ppo: seconds per iteration (rollout / experience / train) at the 1.8B shape, four models on one GPU.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from align.bench import _alternate, _median_time, hf_sample, phase_split, profile_table, row

QWEN_1_8B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=24,
    num_attention_heads=16,
    seq_length=8192,
    max_position_embeddings=8192,
)
QWEN_7B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    seq_length=8192,
    max_position_embeddings=8192,
)


def _sync() -> None:
    torch.cuda.synchronize()


def peak_bf16(n: int = 8192, reps: int = 10) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = min(_median_time(lambda: (a @ b, _sync()), 1) for _ in range(reps))
    return 2 * n**3 / t / 1e12


def _models(shape: dict):
    """Ours and transformers' Qwen2, same weights, bf16 on the GPU (built on the GPU, not the CPU)."""
    import transformers

    from base_model import QwenConfig, QwenForCausalLM
    from base_model.checkpoint import config_to_hf

    config = QwenConfig(**shape)
    ours = QwenForCausalLM(config, device="cuda", seed=0, dtype=torch.bfloat16)
    with torch.device("cuda"):
        hf_config = transformers.Qwen2Config(**config_to_hf(config, torch.bfloat16))
        hf_config._attn_implementation = "sdpa"
        hf = transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16)
    hf.load_state_dict(ours.state_dict())
    return config, ours, hf


def _fwd_bwd(m, ids):
    def run():
        m.zero_grad(set_to_none=True)
        m(ids).logits.float().logsumexp(-1).mean().backward()
        _sync()

    return run


def model(peak: float, reps: int = 5) -> list[dict]:
    out = []
    for name, shape, batch in (("1.8b", QWEN_1_8B, 4), ("7b", QWEN_7B, 2)):
        config, ours, hf = _models(shape)
        ours.train(), hf.train()
        ids = torch.randint(0, config.vocab_size, (batch, 2048), device="cuda")
        flops = config.flops_per_token(2048)
        tokens = batch * 2048
        t_ours, t_peer = _alternate(_fwd_bwd(ours, ids), _fwd_bwd(hf, ids), reps)
        out.append(row("model", f"fwd_bwd_tokens_per_s_bf16_{name}", tokens / t_ours, tokens / t_peer, "tokens/s"))
        ours.compile_layers()
        _fwd_bwd(ours, ids)()  # compilation
        t_comp, t_peer = _alternate(_fwd_bwd(ours, ids), _fwd_bwd(hf, ids), reps)
        out.append(
            row("model", f"fwd_bwd_tokens_per_s_bf16_{name}_compiled", tokens / t_comp, tokens / t_peer, "tokens/s")
        )
        best = min(t_ours, t_comp)
        out.append(
            row(
                "model",
                f"mfu_bf16_{name}",
                tokens / best * flops / (peak * 1e12),
                tokens / t_peer * flops / (peak * 1e12),
                "fraction of measured bf16 matmul peak",
            )
        )
        del ours, hf
        torch.cuda.empty_cache()
    return out


def generate(reps: int = 2, batch: int = 64, prompt_len: int = 128, new_tokens: int = 256) -> list[dict]:
    from base_model.generate import SamplingParams
    from base_model.generate import generate as ours_generate

    config, ours, hf = _models(QWEN_1_8B)
    ours.eval(), hf.eval()
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), device="cuda")
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=0.9, seed=0)

    def run_ours():
        out = ours_generate(ours, prompts.tolist(), sampling)
        _sync()
        assert sum(len(t) for t in out.token_ids) == batch * new_tokens

    def run_peer():
        hf_sample(hf, prompts, new_tokens)
        _sync()

    for name, fn in (("ours", run_ours), ("transformers", run_peer)):  # first calls: capture, warm-up
        t0 = time.perf_counter()
        fn()
        print(f"[generate] {name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
    t_ours, t_peer = _alternate(run_ours, run_peer, reps)
    tokens = batch * new_tokens
    out = [row("generate", "sampling_tokens_per_s_bf16_1.8b", tokens / t_ours, tokens / t_peer, "tokens/s")]
    out.append(_spans_against_whole_cache(ours, prompts, 2 * new_tokens))

    # where a decoding step's time goes: a few static steps outside the graph, so that each launch shows too
    short = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=0)
    call = lambda: ours_generate(ours, prompts.tolist(), short, decode="static")  # noqa: E731
    call()
    print(profile_table(call, f"generate, eager layers: prefill + 16 static steps, batch {batch}"), flush=True)
    ours.compile_layers()  # `model.compile: true`: the captured decoding step runs the compiled layers' kernels
    t0 = time.perf_counter()
    run_ours()
    print(f"[generate] ours, compiled layers: first call (compiles) {time.perf_counter() - t0:.1f} s", flush=True)
    t_compiled, t_peer = _alternate(run_ours, run_peer, reps)
    # the compiled run as measured (the graph's kernels; other shapes would compile again)
    print(profile_table(run_ours, f"generate, compiled layers: prefill + {new_tokens} graph steps"), flush=True)
    note = "tokens/s, model.compile: true (peer: transformers generate)"
    out.append(row("generate", "sampling_tokens_per_s_bf16_1.8b_compiled", tokens / t_compiled, tokens / t_peer, note))
    return out


def _spans_against_whole_cache(ours, prompts: torch.Tensor, new_tokens: int) -> dict:
    """Static steps over growing spans of the cache (the default) against the same steps over the whole buffer,
    at a longer generation, where most of a step's bytes are the cache's keys and values."""
    from base_model import generate as generate_module

    default = generate_module.MIN_SPAN_KEYS
    sampling = generate_module.SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=0.9, seed=0)

    def with_spans(min_keys: int):
        def run():
            generate_module.MIN_SPAN_KEYS = min_keys
            try:
                generate_module.generate(ours, prompts.tolist(), sampling)
                _sync()
            finally:
                generate_module.MIN_SPAN_KEYS = default

        return run

    t_spans, t_whole = _alternate(with_spans(default), with_spans(1 << 30), 1)
    tokens = prompts.shape[0] * new_tokens
    note = f"tokens/s, {prompts.shape[1]} + {new_tokens} tokens (peer: the same steps over the whole cache)"
    return row(
        "generate", f"sampling_tokens_per_s_bf16_1.8b_{new_tokens}_new_spans", tokens / t_spans, tokens / t_whole, note
    )


def sft(steps: int = 8) -> list[dict]:
    """The trainer's tokens/s against the bare model's fwd+bwd tokens/s on the same packed rows: with one
    micro-batch per optimizer step (the optimizer's step in every one) and with 8 (an SFT batch of 32 x 2048)."""
    out = []
    for accum in (1, 8):
        trainer, bare_rate, setup_s, split = _sft_rates(steps, accum)
        suffix = "" if accum == 1 else f"_accum{accum}"
        note = f"tokens/s (peer: bare model fwd+bwd), micro-batch 4 x 2048, {accum} per optimizer step"
        out.append(row("sft", f"trainer_tokens_per_s_bf16_1.8b{suffix}", trainer, bare_rate, note))
        for phase, ms in split.items():  # where the trainer's step goes
            out.append(row("sft", f"step_ms_{phase}_1.8b{suffix}", ms, None, "ms per optimizer step, GPU clock"))
        if accum == 1:
            out.append(row("sft", "setup_seconds_1.8b", setup_s, None, "s"))
        torch.cuda.empty_cache()
    return out


def _sft_rates(steps: int, accum: int) -> tuple[float, float, float, dict[str, float]]:
    from align.core.records import write_jsonl_atomic
    from align.world import demo as world
    from sft import train as sft_train

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        convs = world.sft_conversations(3000 * accum + 3000, seed=0)  # ~94 tokens each: every step's rows fresh
        write_jsonl_atomic(d / "data.jsonl", [{"messages": c["messages"]} for c in convs])
        cfg = sft_train.SFTConfig.model_validate(
            {
                "model": {
                    "config": str(Path(__file__).resolve().parent.parent / "configs/model/qwen-1.8b.yaml"),
                    "tokenizer": "cl100k_base",
                },
                "data": {"train": str(d / "data.jsonl"), "max_len": 2048, "packing": True},
                "optim": {"lr": 1e-5, "schedule": "constant"},
                "train": {
                    "micro_batch_size": 4,
                    "grad_accum": accum,
                    "max_steps": steps + 4,  # the last two split and profiled
                    "log_every": 1000,
                    "save_every": 0,
                },
                "deepspeed": {"zero_stage": 2, "bf16": True},
                "out_dir": str(d / "out"),
            }
        )
        t0 = time.perf_counter()
        run = sft_train.setup(cfg)
        setup_s = time.perf_counter() - t0
        run.engine.train()
        times, tokens = [], []
        for step in range(steps + 2):
            _sync()
            t0 = time.perf_counter()
            m = sft_train.train_step(run, step)
            _sync()
            if step >= 2:  # warm-up steps excluded
                times.append(time.perf_counter() - t0)
                tokens.append(m["tokens"])
        trainer = sum(tokens) / sum(times)
        split = phase_split(run.engine, lambda: sft_train.train_step(run, steps + 2))
        print(f"[sft] step with {accum} micro-batches, ms on the GPU's clock: {split}", flush=True)
        title = f"sft step, {accum} micro-batches"
        print(profile_table(lambda: sft_train.train_step(run, steps + 3), title), flush=True)
        # a plain copy of the model (the engine's module carries ZeRO's gradient hooks), same shape and dtype
        from base_model import QwenForCausalLM

        module = run.engine.module
        bare_model = QwenForCausalLM(module.config, device="cuda", seed=0, dtype=next(module.parameters()).dtype)
        bare_model.train()
        b = {k: v.cuda() for k, v in sft_train.collate(run.batches.get(0), run.tokenizer.pad_id).items()}

        def bare():
            bare_model.zero_grad(set_to_none=True)
            bare_model(b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss_sum.backward()
            _sync()

        bare()
        t_bare = _median_time(bare, 5)
        bare_rate = sum(len(r["input_ids"]) for r in run.batches.get(0)) / t_bare
    return trainer, bare_rate, setup_s, split


def ppo(iterations: int = 3) -> list[dict]:
    """`align ppo` at the 1.8B shape (fresh weights: speed, not learning), native engine, bf16, ZeRO-0."""
    from align.core.distributed import subprocess_env
    from align.core.metrics import read_metrics
    from align.core.records import write_jsonl_atomic
    from base_model import QwenConfig, QwenForCausalLM, QwenTokenizer, save_pretrained
    from rm.model import RewardModel

    root = Path(__file__).resolve().parent.parent
    tok = QwenTokenizer.load("cl100k_base")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        config = QwenConfig(**QWEN_1_8B)
        lm = QwenForCausalLM(config, device="cuda", seed=0, dtype=torch.bfloat16)
        save_pretrained(lm, d / "policy", tok)
        rm = RewardModel(lm, "end_token", tok.eod_id)
        rm.save(d / "reward", tok)
        del lm, rm
        torch.cuda.empty_cache()
        write_jsonl_atomic(d / "prompts.jsonl", [{"prompt": f"Tell me about the number {i}."} for i in range(256)])
        cmd = [
            sys.executable,
            "-m",
            "align.cli",
            "ppo",
            str(root / "configs/ppo/tiny.yaml"),
            f"models.policy={d / 'policy'}",
            f"models.reward={d / 'reward'}",
            f"data.prompts={d / 'prompts.jsonl'}",
            "data.eval_prompts=null",
            "data.ptx=null",
            f"ppo.iterations={iterations}",
            "ppo.rollout_batch_size=32",
            "ppo.n_samples=2",
            "ppo.max_new_tokens=256",
            "ppo.mini_batch_size=16",
            "ppo.ppo_epochs=1",
            "ppo.critic_warmup_steps=0",
            "train.micro_batch_size=8",
            "policy_deepspeed.bf16=true",
            "value_deepspeed.bf16=true",
            "train.eval_every=0",
            "train.save_every=0",
            "train.save_state=false",  # the final checkpoint: models only (AdamW state at 1.8B is ~50 GB)
            f"out_dir={d / 'ppo'}",
        ]
        print(f"[ppo] models saved in {time.perf_counter() - t0:.0f} s; running align ppo", flush=True)
        done = subprocess.run(cmd, cwd=root, env=subprocess_env())  # its progress goes to this log
        if done.returncode:
            raise RuntimeError(f"align ppo failed with exit status {done.returncode}")
        rows = [r for r in read_metrics(d / "ppo") if "train/time/rollout_s" in r][1:]
    med = lambda k: statistics.median(r[k] for r in rows)
    return [
        row("ppo", "rollout_seconds_1.8b", med("train/time/rollout_s"), None, "s/iteration"),
        row("ppo", "experience_seconds_1.8b", med("train/time/experience_s"), None, "s/iteration"),
        row("ppo", "train_seconds_1.8b", med("train/time/train_s"), None, "s/iteration"),
        row("ppo", "rollout_tokens_per_s_1.8b", med("train/rollout_tokens_per_s"), None, "tokens/s"),
    ]


def run_suite(suite: str, peak: float | None) -> list[dict]:
    if suite == "peak":
        return [row("peak", "matmul_bf16", peak_bf16(), None, "TFLOP/s")]
    if suite == "model":
        return model(peak or peak_bf16())
    if suite == "generate":
        return generate()
    if suite == "sft":
        return sft()
    if suite == "ppo":
        return ppo()
    raise ValueError(f"suite {suite!r} has no GPU variant; run it without --device cuda")
