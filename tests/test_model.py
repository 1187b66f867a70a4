"""Model behaviour: packing, KV cache, dtypes, windows, checkpointing, generation."""

import pytest
import torch

from base_model import QwenForCausalLM
from base_model import generate as generate_module
from base_model.generate import PACK_FROM_STEPS, SamplingParams, UniformTable, filter_logits, generate, sample_tokens
from base_model.model import _attention_biases
from base_model.packed_linear import prepacked_linears
from conftest import randomize_biases, tiny_config


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_biases(QwenForCausalLM(tiny_config(**overrides)), seed).eval()


@pytest.mark.parametrize("flags", [dict(), dict(use_dynamic_ntk=True, use_logn_attn=True)])
def test_packed_rows_equal_separate_documents(flags):
    model = _model(**flags)
    docs = [torch.randint(0, 300, (n,)) for n in (10, 7, 5)]
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(row, position_ids=positions).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    assert (packed - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("windows", [None, [6, None], [12, 4]])
def test_packed_batch_attends_by_document_with_the_gradients_of_separate_documents(windows):
    """Two packed rows: each layer attends one document at a time, or (where a window cuts a document) through the
    block-diagonal mask; logits and gradients equal those of the documents run one by one."""
    model = _model(window_sizes=windows).train()
    model.config.hidden_dropout = model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.self_attn.dropout = 0.0
    rows = [[torch.randint(0, 300, (n,)) for n in lengths] for lengths in ((10, 7, 5), (4, 18))]
    ids = torch.stack([torch.cat(docs) for docs in rows])  # (2, 22)
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in docs]) for docs in rows])
    doc_ids = (positions == 0).cumsum(-1)
    biases = _attention_biases(model.config, ids.shape[1], 0, None, doc_ids, ids.device)
    by_document = {w: b.documents is not None for w, b in biases.items()}
    assert (
        by_document
        == {None: {None: True}, (6, None): {6: False, None: True}, (12, 4): {12: False, 4: False}}[
            tuple(windows) if windows else None
        ]
    )
    if windows is None:
        assert biases[None].documents == [(0, 0, 10), (0, 10, 17), (0, 17, 22), (1, 0, 4), (1, 4, 22)]
    packed = model(ids, position_ids=positions).logits
    packed.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.stack([torch.cat([model(d[None]).logits[0] for d in docs]) for docs in rows])
    alone.square().sum().backward()
    assert (packed - alone).abs().max().item() < 1e-5
    for n, p in model.named_parameters():
        assert (grads[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), n


def test_packed_training_loss_equals_separate():
    model = _model().train()
    docs = [torch.randint(0, 300, (n,)) for n in (9, 6)]
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = model(row, position_ids=positions).logits[0]
    alone = torch.cat([model(d[None]).logits[0] for d in docs])
    assert (packed - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "flags", [dict(), dict(use_dynamic_ntk=True, use_logn_attn=True), dict(window_sizes=[3, None])]
)
def test_kv_cache_decoding_equals_full_forward(flags):
    model = _model(**flags)
    ids = torch.randint(0, 300, (2, 30))  # below seq_length (64)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :12], past_key_values=cache).logits]
        for t in range(12, 30):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_preallocated_cache_grows_past_its_buffer():
    model = _model()
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(max_length=12)
        steps = [model(ids[:, :10], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(10, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_bf16_agrees_with_fp32():
    model = _model(initializer_range=0.05, use_dynamic_ntk=True, use_logn_attn=True)
    ids = torch.randint(0, 300, (2, 100))  # past seq_length: NTK and LogN active
    with torch.no_grad():
        fp32 = model(ids).logits
        bf16 = model.to(torch.bfloat16)(ids).logits.float()
    err = (bf16 - fp32).abs()
    # bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); errors compound over layers
    assert err.mean().item() < 0.02 * fp32.abs().mean().item()
    assert err.max().item() < 0.05 * fp32.abs().max().item()


def test_rotary_stays_fp32_in_bf16():
    from base_model.model import rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(5)[None], 16, [10000.0])
    assert cos.dtype == sin.dtype == torch.float32


@pytest.mark.parametrize("rotary", [16, 8])  # whole head, and partial rotary (rotary_pct 0.5)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_half_rotation_formula(rotary, dtype):
    """apply_rope against Qwen v1's formula: the first R channels become x * cos + rotate_half(x) * sin in fp32,
    rotate_half(x) = (-x2, x1), the rest pass through; bitwise, with queries and keys rotated together or apart."""
    from base_model.model import apply_rope, rope_cos_sin

    positions = torch.tensor([[0, 1, 2, 7, 300], [5, 6, 7, 8, 9]])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary, 2).float() / rotary))
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # (B, 1, L, R)
    x = torch.randn(2, 3, 5, 16).to(dtype)  # (B, heads, L, D)
    head, rest = x[..., :rotary].float(), x[..., rotary:]
    x1, x2 = head.chunk(2, dim=-1)
    expected = torch.cat(((head * cos + torch.cat((-x2, x1), dim=-1) * sin).to(dtype), rest), dim=-1)
    ours = apply_rope(x, *rope_cos_sin(positions, rotary, [10000.0]))
    assert ours.dtype == dtype and torch.equal(ours, expected)


def test_window_attention_limits_what_a_position_sees():
    model = _model(num_hidden_layers=1, window_sizes=[4])
    ids = torch.randint(0, 300, (1, 12))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 300
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    diff = (a - b).abs().amax(-1)[0]
    assert diff[:4].min() > 0 and diff[4:].max() == 0  # position p sees p-3..p


def test_window_larger_than_input_changes_nothing():
    full, windowed = _model(), _model(window_sizes=[64, 64])
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, windowed(ids).logits, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = _model(gradient_checkpointing=ckpt).train()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
        model(ids).logits.logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dropout_only_in_training():
    model = _model(attention_dropout=0.5, hidden_dropout=0.5)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_left_padded_batch_generation_equals_single():
    model = _model(use_dynamic_ntk=True, use_logn_attn=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    batched = generate(model, prompts, greedy, pad_id=0)
    for i, p in enumerate(prompts):
        single = generate(model, [p], greedy)
        assert batched.token_ids[i] == single.token_ids[0]
        assert torch.allclose(torch.tensor(batched.logprobs[i]), torch.tensor(single.logprobs[0]), atol=1e-5)


def test_generation_stops_and_reports_logprobs():
    model = _model()
    prompt = [1, 2, 3]
    free = generate(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0))
    stop_id = free.token_ids[0][3]
    out = generate(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop_id,)))
    first = free.token_ids[0].index(stop_id)
    assert out.token_ids[0] == free.token_ids[0][: first + 1] and out.finish_reasons == ["stop"]
    assert free.finish_reasons == ["length"]
    with torch.no_grad():
        full = model(torch.tensor([prompt + free.token_ids[0]])).logits[0].log_softmax(-1)
    expected = [full[len(prompt) - 1 + j, t].item() for j, t in enumerate(free.token_ids[0])]
    assert torch.allclose(torch.tensor(free.logprobs[0]), torch.tensor(expected), atol=1e-5)


def test_sampling_is_seeded():
    model = _model()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = generate(model, [[1, 2], [3]], params), generate(model, [[1, 2], [3]], params)
    assert a.token_ids == b.token_ids


def test_top_p_and_top_k_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, 1.0, top_p=0.7, top_k=0).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 crosses it: both kept
    kept = filter_logits(logits, 1.0, top_p=1.0, top_k=1).isfinite()[0].tolist()
    assert kept == [True, False, False, False]


def test_top_p_by_rejection_samples_the_nucleus():
    """Drawing from the whole distribution and rejecting draws outside the nucleus gives the renormalised nucleus,
    the same distribution as cutting a sorted vocabulary; also when rows fall back to the sort after one round."""
    g = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randn(12, generator=g) * 2, torch.randn(12, generator=g) * 0.05])  # peaked, flat
    for top_p, rounds in ((0.6, 16), (0.3, 1)):
        nucleus = filter_logits(logits, 1.0, top_p, 0).softmax(-1)  # (2, 12) the definition, by sorting
        n = 20000
        probs = logits.softmax(-1).repeat_interleave(n, 0)  # (2n, 12)
        ids = sample_tokens(probs, torch.Generator().manual_seed(1), top_p=top_p, max_rounds=rounds).view(2, n)
        freq = torch.stack([torch.bincount(r, minlength=12).float() / n for r in ids])
        assert torch.all(freq[nucleus == 0] == 0)  # nothing outside the nucleus, ever
        assert torch.allclose(freq, nucleus, atol=0.015)


def test_rounds_drawn_at_once_sample_the_nucleus():
    """The GPU's way (every row's first rounds from pre-drawn uniforms, one check after them) samples the same
    distribution: with enough rounds, with rows left for the generator's rounds, and with rows left for the sort."""
    g = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randn(12, generator=g) * 2, torch.randn(12, generator=g) * 0.05])  # peaked, flat
    n = 20000
    for top_p, at_once, rounds in ((0.6, 4, 16), (0.3, 1, 3), (0.3, 2, 2), (1.0, 1, 16)):
        nucleus = filter_logits(logits, 1.0, top_p, 0).softmax(-1)
        probs = logits.softmax(-1).repeat_interleave(n, 0)  # (2n, 12)
        uniforms = torch.rand((2 * n, at_once), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        ids = sample_tokens(probs, torch.Generator().manual_seed(1), None, top_p, rounds, uniforms).view(2, n)
        freq = torch.stack([torch.bincount(r, minlength=12).float() / n for r in ids])
        assert torch.all(freq[nucleus == 0] == 0), (top_p, at_once)
        assert torch.allclose(freq, nucleus, atol=0.015), (top_p, at_once)


def test_uniform_table_keeps_each_rows_stream_its_own():
    """Per-row generators drawn a block at a time: a row's draws do not depend on the other rows, and steps past a
    block continue the same streams."""
    rows = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    alone = UniformTable(1, 4, torch.device("cpu"), None, rows([7]), block=3)
    batch = UniformTable(3, 4, torch.device("cpu"), None, rows([5, 7, 9]), block=3)
    for step in range(8):
        assert torch.equal(alone(step)[0], batch(step)[1])
    expected = torch.rand((6, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fresh = UniformTable(1, 4, torch.device("cpu"), None, rows([7]), block=3)
    assert torch.equal(torch.stack([fresh(s)[0] for s in range(6)]), expected)


def test_generation_with_rounds_drawn_at_once(monkeypatch):
    """With the GPU's sampling forced on the CPU: a row-seeded row samples the same tokens alone or in a batch,
    and dynamic and static decoding agree token for token."""
    monkeypatch.setattr(generate_module, "draws_at_once", lambda device: True)
    model = _model()
    sampling = lambda seeds: SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.8, row_seeds=seeds)
    alone = generate(model, [[5, 6, 7]], sampling([3]))
    batch = generate(model, [[9, 10], [5, 6, 7], [11]], sampling([1, 3, 2]))
    assert batch.token_ids[1] == alone.token_ids[0]
    assert torch.allclose(torch.tensor(batch.logprobs[1]), torch.tensor(alone.logprobs[0]), atol=1e-5)
    prompts = [[5, 6, 7, 8], [9, 10]]
    shared = SamplingParams(max_new_tokens=PACK_FROM_STEPS + 4, temperature=0.9, top_p=0.9, seed=4)
    dynamic = generate(model, prompts, shared, decode="dynamic")
    static = generate(model, prompts, shared, decode="static")
    assert static.token_ids == dynamic.token_ids


def test_prepacked_linears_decode_like_the_plain_model():
    model = _model()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    greedy = SamplingParams(max_new_tokens=PACK_FROM_STEPS + 4, temperature=0)
    with torch.no_grad():
        with prepacked_linears(model, rows=2) as n:
            assert n == 7 * model.config.num_hidden_layers + 1  # q, k, v, o, gate, up, down per layer; lm_head
            packed = model(torch.tensor(prompts)).logits
        plain = model(torch.tensor(prompts)).logits
    assert "forward" not in vars(model.lm_head)  # the module's own forward is back
    assert torch.allclose(packed, plain, atol=1e-5)
    with prepacked_linears(model, rows=2) as n:
        assert n == 0  # never while gradients are recorded: the packed copy would not receive them
    out = generate(model, prompts, greedy)  # packs from the second step on
    with torch.no_grad():
        full = model(torch.tensor([p + t for p, t in zip(prompts, out.token_ids)])).logits.log_softmax(-1)
    for i, (p, toks) in enumerate(zip(prompts, out.token_ids)):
        assert toks == full[i, len(p) - 1 : -1].argmax(-1).tolist()
        expected = [full[i, len(p) - 1 + j, t].item() for j, t in enumerate(toks)]
        assert torch.allclose(torch.tensor(out.logprobs[i]), torch.tensor(expected), atol=1e-5)


def test_compiled_layers_decode_like_the_eager_model(monkeypatch):
    """With `compile_layers` (a config's `model.compile: true`), generation runs the compiled layers in its static
    steps and packs no weights (dynamo cannot trace oneDNN's packed op: it crashed); the tokens and logprobs are the
    eager model's, also as the static steps move to a longer span of the cache (another shape to compile)."""
    monkeypatch.setattr(generate_module, "MIN_SPAN_KEYS", 16)  # 4 + 28 keys: spans of 16 and 32
    model = _model(num_hidden_layers=1)
    prompts = [[5, 6, 7, 8], [9, 10]]
    greedy = SamplingParams(max_new_tokens=28, temperature=0)
    eager = generate(model, prompts, greedy, decode="static")
    model.compile_layers()
    with torch.no_grad(), prepacked_linears(model, rows=2) as n:
        assert n == 0
    for decode in ("static", "dynamic"):
        out = generate(model, prompts, greedy, decode=decode)
        assert out.token_ids == eager.token_ids, decode
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(eager.logprobs), atol=1e-4), decode


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).repeat(20000, 1)
    ids = sample_tokens(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    assert freq[1] == 0  # a token of probability 0 is never drawn
    assert torch.allclose(freq, probs[0], atol=0.015)
    rows = [torch.Generator().manual_seed(s) for s in range(3)]
    a = sample_tokens(probs[:3], row_generators=rows)
    b = sample_tokens(probs[:3], row_generators=[torch.Generator().manual_seed(s) for s in range(3)])
    assert torch.equal(a, b)
