"""The code behind the GPU paths, run on the CPU against the reference paths: meta-device construction and
single initialisation, loading onto a device, the packed-attention paths, the chunked loss, static decoding."""

import collections
import math
import time

import pytest
import torch
import torch.nn.functional as F

from base_model import QwenConfig, QwenForCausalLM, load_pretrained, save_pretrained
from base_model import generate as generate_module
from base_model.generate import SamplingParams, generate, row_bytes, rows_that_fit, span_keys, step_span
from base_model.losses import linear_cross_entropy_sum, token_logprobs
from base_model.model import _attention_biases, _mask_bias
from conftest import randomize_biases, tiny_config


def test_7b_shape_model_is_constructed_on_meta_in_under_a_second():
    config = QwenConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    QwenForCausalLM(tiny_config(), device="meta")  # torch's one-time set-up of meta kernels is not construction
    t0 = time.perf_counter()
    model = QwenForCausalLM(config, device="meta")
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def _reference_init(config, seed):
    """Qwen v1's initialisation written out: each parameter in named order, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    std, out = config.initializer_range, {}
    for name, shape in _shapes(config):
        if name.endswith("bias"):
            out[name] = torch.zeros(shape)
        elif "layernorm" in name or name == "model.norm.weight":
            out[name] = torch.ones(shape)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = torch.empty(shape).normal_(0.0, std / math.sqrt(2 * config.num_hidden_layers), generator=g)
        else:
            out[name] = torch.empty(shape).normal_(0.0, std, generator=g)
    return out


def _shapes(config):
    e, f, v, d = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    h, g = config.num_attention_heads, config.num_key_value_heads
    yield "model.embed_tokens.weight", (v, e)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (e,)
        for name, rows in (("q", h * d), ("k", g * d), ("v", g * d)):
            yield p + f"self_attn.{name}_proj.weight", (rows, e)
            yield p + f"self_attn.{name}_proj.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (e, h * d)
        yield p + "post_attention_layernorm.weight", (e,)
        yield p + "mlp.gate_proj.weight", (f, e)
        yield p + "mlp.up_proj.weight", (f, e)
        yield p + "mlp.down_proj.weight", (e, f)
    yield "model.norm.weight", (e,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (v, e)


@pytest.mark.parametrize("tie", [False, True])
def test_model_is_initialised_once_on_the_target_device_as_the_seeded_reference(tie):
    config = tiny_config(tie_word_embeddings=tie)
    torch.manual_seed(123)  # the global RNG plays no part
    model = QwenForCausalLM(config, device="cpu", seed=7)
    expected = _reference_init(config, 7)
    params = dict(model.named_parameters())
    assert list(params) == list(expected)
    for name, p in params.items():
        assert torch.equal(p, expected[name]), name
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_checkpoint_loads_straight_onto_the_device_in_the_asked_dtype(tmp_path):
    model = randomize_biases(QwenForCausalLM(tiny_config(), seed=0))
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.bfloat16(), b), n


def test_one_masked_attention_call_equals_attention_by_document_in_logits_and_gradients():
    """The block-diagonal mask (one SDPA call for all documents) and the per-document path give the same logits
    and gradients; on CUDA the varlen call is checked against both in the GPU tier."""
    torch.manual_seed(0)
    model = randomize_biases(QwenForCausalLM(tiny_config(), seed=0)).train()
    rows = [[torch.randint(0, 300, (n,)) for n in lengths] for lengths in ((10, 7, 5), (4, 18))]
    ids = torch.stack([torch.cat(docs) for docs in rows])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in docs]) for docs in rows])
    doc_ids = (positions == 0).cumsum(-1)
    by_doc = _attention_biases(model.config, ids.shape[1], 0, None, doc_ids, ids.device)
    assert by_doc[None].documents is not None
    results = []
    for force_mask in (False, True):
        model.zero_grad()
        if force_mask:
            import base_model.model as m

            original = m._attention_biases
            m._attention_biases = lambda cfg, length, past, mask, doc, dev, dtype=None: {
                None: _mask_bias(length, past, mask, doc, None, False, dev)
            }
            try:
                logits = model(ids, position_ids=positions).logits
            finally:
                m._attention_biases = original
        else:
            logits = model(ids, position_ids=positions).logits
        logits.square().sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() < 1e-5
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= 1e-5 * gb[n].abs().max(), n


@pytest.mark.parametrize("rows", [None, 7])
def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_its_gradients(rows):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    plain = F.cross_entropy((hidden @ weight.T).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum")
    plain.backward(torch.tensor(0.7))
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused = linear_cross_entropy_sum(hidden, weight, labels, rows=rows)
    fused.backward(torch.tensor(0.7))
    assert abs(fused.item() - plain.item()) <= 1e-5 * abs(plain.item())
    assert (hidden.grad - gh).abs().max() < 1e-5 and (weight.grad - gw).abs().max() < 1e-5
    with torch.no_grad():
        assert abs(linear_cross_entropy_sum(hidden, weight, labels, rows=rows).item() - plain.item()) < 1e-3


def test_chunked_loss_in_bf16_is_as_close_to_fp32_as_the_plain_bf16_loss():
    """In bf16 each chunk's weight gradient is a bf16 matmul summed in fp32 (an fp32 matmul is the slow path on a
    GPU): its error against the fp32 gradients stays within twice that of autograd through bf16 logits."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(512, 64), torch.randn(3000, 64) * 0.1
    labels = torch.randint(0, 3000, (512,))
    labels[:40] = -100

    def grads(h, w, loss):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss(h, w).backward()
        return h.grad.float(), w.grad.float()

    plain = lambda h, w: F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="sum")
    exact = grads(hidden, weight, plain)
    bf16 = hidden.bfloat16(), weight.bfloat16()
    for ours, theirs, ref in zip(
        grads(*bf16, lambda h, w: linear_cross_entropy_sum(h, w, labels, rows=100)), grads(*bf16, plain), exact
    ):
        assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max()


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("rows", [None, 7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_token_logprobs_and_entropy_equal_those_of_the_logits(rows, with_entropy):
    """PPO's and DPO's per-token log-probabilities (and PPO's entropy bonus) from hidden states a chunk of rows at a
    time: the values, and the gradients of a loss of both (or of the log-probabilities alone), within 1e-5."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 11))
    a, b = torch.randn(3, 11), torch.randn(3, 11)
    lp, ent = logprobs_and_entropy(hidden @ weight.T, tokens)
    ((lp * a).sum() + (ent * b).sum() * with_entropy).backward()
    expected = lp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    lp, ent = token_logprobs(hidden, weight, tokens, entropy=True, rows=rows)
    ((lp * a).sum() + ((ent * b).sum() if with_entropy else 0)).backward()
    for ours, theirs in zip((lp, ent, hidden.grad, weight.grad), expected):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    with torch.no_grad():
        lp, ent = token_logprobs(hidden, weight, tokens, rows=rows)
    assert ent is None and (lp - expected[0]).abs().max() < 1e-5


def test_model_token_logprobs_equal_those_of_its_logits():
    torch.manual_seed(0)
    model = QwenForCausalLM(tiny_config(), seed=0).train()
    ids = torch.randint(0, 300, (2, 12))
    a, b = torch.randn(2, 11), torch.randn(2, 11)
    lp, ent = logprobs_and_entropy(model(ids).logits[:, :-1], ids[:, 1:])
    ((lp * a).sum() + (ent * b).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = model(ids, token_logprobs=True, entropy=True)
    assert out.logits is None
    assert (out.token_logprobs - lp).abs().max() < 1e-5 and (out.entropy - ent).abs().max() < 1e-5
    ((out.token_logprobs * a).sum() + (out.entropy * b).sum()).backward()
    for n, p in model.named_parameters():
        assert (p.grad - grads[n]).abs().max() <= 1e-5 * max(grads[n].abs().max(), 1e-6), n
    assert model(ids, token_logprobs=True).entropy is None


def test_model_loss_from_labels_equals_the_loss_of_its_logits():
    from align.core.losses import summed_token_loss

    torch.manual_seed(0)
    model = QwenForCausalLM(tiny_config(), seed=0).train()
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    plain = summed_token_loss(model(ids).logits, labels)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(ids, labels=labels).loss_sum
    fused.backward()
    assert abs(fused.item() - plain.item()) < 1e-5 * plain.item()
    for n, p in model.named_parameters():
        assert (p.grad - grads[n]).abs().max() <= 1e-5 * max(grads[n].abs().max(), 1e-6), n


@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(use_dynamic_ntk=True, use_logn_attn=True, seq_length=16),  # the cache passes seq_length: LogN scales
        dict(use_logn_attn=True, seq_length=64),  # it does not: the static step leaves LogN out
        dict(window_sizes=[3, None]),
        dict(rotary_pct=0.5),  # partial rotary: half of each head's channels pass through
    ],
)
@pytest.mark.parametrize("span_keys", [16, 256])  # spans of 16 keys: 2 or 3 per generation; 256: the whole cache
def test_static_cache_decoding_equals_dynamic_decoding(flags, span_keys, monkeypatch):
    monkeypatch.setattr(generate_module, "MIN_SPAN_KEYS", span_keys)
    torch.manual_seed(0)
    model = randomize_biases(QwenForCausalLM(tiny_config(**flags), seed=0)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # left padding in the batch
    for sampling in (
        SamplingParams(max_new_tokens=20, temperature=0),
        SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, row_seeds=[1, 2, 3]),
    ):
        dynamic = generate(model, prompts, sampling, decode="dynamic", return_logits=True)
        static = generate(model, prompts, sampling, decode="static", return_logits=True)
        assert static.token_ids == dynamic.token_ids
        for a, b in zip(static.step_logits, dynamic.step_logits):
            assert (a - b).abs().max() < 1e-4
        assert torch.allclose(torch.tensor(static.logprobs), torch.tensor(dynamic.logprobs), atol=1e-5)


def test_static_steps_attend_over_growing_spans_that_hold_every_written_position():
    assert span_keys(384) == 256 and span_keys(4096) == 512 and span_keys(100) == 256
    length, keys = 80, 16
    spans = [step_span(p, length, keys) for p in range(length)]
    assert all(p < s <= length and s % keys == 0 for p, s in zip(range(length), spans))
    assert spans == sorted(spans) and spans[0] == 16 and spans[-1] == 80
    model = QwenForCausalLM(tiny_config(), seed=0).eval()
    cache = model.new_cache(max_length=64)
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 5)), past_key_values=cache, last_only=True)
        cache.start_static_decoding(None, cache.inv_freq)
        cache.span = 16
        k, _ = cache.update(0, *(torch.zeros(2, 2, 1, model.config.head_dim) for _ in range(2)))
    assert k.shape[2] == 16 and cache.keys[0].shape[2] == 64  # the step reads 16 keys of the 64 held


def test_a_static_decoding_step_runs_few_kernels():
    """A captured decoding step replays every kernel of every layer, each one a launch of a few microseconds on a
    GPU: queries and keys are rotated together, the attention mask is built once per step in the model's dtype
    (not converted in every layer) and LogN is left out while no position reaches seq_length. Counted as the
    non-view aten operations of a bf16 step (51 per layer before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ != "_unsafe_view":  # views launch nothing
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def step_ops(layers):
        config = tiny_config(num_hidden_layers=layers, use_dynamic_ntk=True, use_logn_attn=True, seq_length=64)
        model = QwenForCausalLM(config, seed=0).eval().to(torch.bfloat16)
        cache = model.new_cache(max_length=32)
        with torch.no_grad():
            model(torch.randint(0, 300, (4, 8)), past_key_values=cache, last_only=True)
            cache.start_static_decoding(None, cache.inv_freq)
            with Count() as count:
                model.decode_step(torch.randint(0, 300, (4, 1)), cache)
        return count.ops

    per_layer = collections.Counter(step_ops(2)) - collections.Counter(step_ops(1))
    assert per_layer.total() <= 37, per_layer
    assert not {"neg", "where", "logical_not"} & set(per_layer), per_layer  # no rotation sign, no mask conversion


def test_rows_that_fit_follow_the_memory_a_row_takes():
    """At the Qwen-1.8B shape in bf16 a row's KV cache is 196,608 bytes per token (24 layers x K and V x 16 heads
    x 128 x 2 B); the estimate adds one layer's prefill activations and the last position's logits, and the rows
    that fit are the free bytes over it (at least one)."""
    cfg = QwenConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                     num_attention_heads=16, head_dim=128)  # fmt: skip
    prompt, new = 1000, 1000  # a static cache of 2000 keys
    kv = 24 * 2 * 16 * 128 * 2000 * 2
    attention, mlp = (2 * 2048 + 3 * 2048 + 4 * 2048) * 2 + 16 * prompt * 4, (2 * 2048 + 3 * 5504) * 2
    prefill = prompt * max(attention, mlp)
    logits = 151936 * (2 + 4 + 4 + 8 + 8)
    per_row = row_bytes(cfg, torch.bfloat16, prompt, new)
    assert per_row == kv + prefill + logits and 196_608 * 2000 == kv
    assert rows_that_fit(cfg, torch.bfloat16, prompt, new, 40 * per_row + per_row // 2) == 40
    assert rows_that_fit(cfg, torch.bfloat16, prompt, new, per_row // 2) == 1
    assert row_bytes(cfg, torch.float32, prompt, new) > per_row
    assert row_bytes(cfg, torch.bfloat16, prompt, new + 1) > per_row  # rounded up to the next 16 keys


def _peak_bytes(fn) -> int:
    """The most bytes of CPU tensors alive at once while `fn` runs, beyond those alive before it, from the
    profiler's allocation records: each operator's own net allocation counted at its start, each free outside an
    operator at its time (a peak inside a single operator is not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    now = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("prompt,new", [(200, 8), (16, 12)])  # prefill-heavy, and decoding-heavy
def test_row_bytes_bound_what_a_row_adds_to_generate(prompt, new):
    """What one more row adds to the peak of a static-cache `generate` (the GPU's path), measured as the
    difference between batches of 2 and 4 rows, stays within the estimate that sizes the native engine's waves."""
    config = tiny_config(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=4096)  # fmt: skip
    model = QwenForCausalLM(config, seed=0).eval()
    sampling = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=0.9, seed=0)
    peaks = {}
    for b in (2, 4):
        prompts = [list(range(1, prompt + 1))] * b
        peaks[b] = _peak_bytes(lambda: generate(model, prompts, sampling, decode="static"))
    per_row = (peaks[4] - peaks[2]) / 2
    kv = 4 * 2 * 2 * 32 * (-(-(prompt + new) // 16) * 16) * 4
    assert kv < per_row <= row_bytes(config, torch.float32, prompt, new), (per_row, kv)


def test_graph_decoding_needs_cuda():
    model = QwenForCausalLM(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=2), decode="graph")
