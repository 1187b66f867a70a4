"""Rollout engines: the native engine and the vLLM adapter pass the same protocol tests; the NaN-guard step."""

import inspect
import json
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from align.core.sections import DeepSpeedSection, OptimConfig
from base_model import QwenForCausalLM
from base_model.generate import SamplingParams, generate
from conftest import randomize_biases, tiny_config
from ppo.rollout.native import NativeEngine
from ppo.rollout.vllm_engine import VLLMEngine, VLLMTimeout, WorkerExtension


class FakeVLLM:
    """A test double of vLLM 0.33's offline API, backed by our own model: `LLM(**engine args)` loads the
    checkpoint folder; `generate` takes TokensPrompt dicts and per-request SamplingParams (logit_bias applied,
    prompt_logprobs) and returns RequestOutputs; `collective_rpc(method, timeout, args)` calls the worker extension,
    passing tensors through a msgpack-like encoding when the engine core would run in another process (every
    backend but external_launcher, as VLLM_ENABLE_V1_MULTIPROCESSING defaults to 1); a prefix cache that keeps
    answers until `reset_prefix_cache()`; `sleep(level)` / `wake_up(tags)` (level 2 discards the weights)."""

    __version__ = "0.33.0"
    started: list = []  # every LLM made, for the tests to inspect
    corrupt = False  # set: weight loads add 0.3 to the final norm (a wrong sync)

    class SamplingParams:
        def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, stop_token_ids=None,
                     logprobs=None, prompt_logprobs=None, seed=None, detokenize=True, logit_bias=None, stop=None,
                     include_stop_str_in_output=False):  # fmt: skip
            self.__dict__.update(locals())
            del self.__dict__["self"]

    class LLM:
        def __init__(self, model, distributed_executor_backend=None, **kwargs):
            from base_model import load_pretrained

            self.kwargs = {"model": model, "distributed_executor_backend": distributed_executor_backend, **kwargs}
            self.multiprocess = distributed_executor_backend != "external_launcher"
            self.model = load_pretrained(model).eval()
            self.worker = type("Worker", (WorkerExtension,), {})()
            self.worker.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load))
            self.calls, self.asleep, self.prefix_cache = [], set(), {}
            FakeVLLM.started.append(self)

        def _load(self, weights):
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in weights:
                    params[name].copy_(t + (0.3 if FakeVLLM.corrupt and name == "model.norm.weight" else 0.0))

        def _sample(self, prompt, sp):
            key = (tuple(prompt), repr(sorted(vars(sp).items())))  # the prompt's KV blocks stand for the whole answer
            if key in self.prefix_cache:  # a stale cache answers with what the old weights computed
                return self.prefix_cache[key]
            bias = sp.logit_bias or {}
            assert all(v == -100.0 for v in bias.values())
            ours = SamplingParams(max_new_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                  top_k=max(sp.top_k, 0), stop_token_ids=tuple(sp.stop_token_ids or ()),
                                  seed=sp.seed, vocab_limit=min(bias) if bias else None)  # fmt: skip
            g = generate(self.model, [prompt], ours)
            steps = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(g.token_ids[0], g.logprobs[0])]
            out = SimpleNamespace(token_ids=g.token_ids[0], logprobs=steps, finish_reason=g.finish_reasons[0])
            self.prefix_cache[key] = out
            return out

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            assert not self.asleep, f"generate while {sorted(self.asleep)} asleep"
            self.calls.append("generate")
            outs = []
            if not isinstance(sampling_params, list):  # one SamplingParams for every prompt, as vLLM allows
                sampling_params = [sampling_params] * len(prompts)
            for prompt, sp in zip(prompts, sampling_params):
                ids = prompt["prompt_token_ids"]
                if sp.prompt_logprobs is not None:
                    with torch.no_grad():
                        logp = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                    scored = [None] + [{t: SimpleNamespace(logprob=logp[i, t].item())} for i, t in enumerate(ids[1:])]
                    outs.append(SimpleNamespace(prompt_logprobs=scored, outputs=[]))
                else:
                    outs.append(SimpleNamespace(outputs=[self._sample(ids, sp)]))
            return outs

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            self.calls.append(method)
            if self.multiprocess:  # vLLM's MsgpackEncoder turns each tensor into [dtype, shape, buffer]
                args = tuple(
                    [(n, [str(t.dtype), list(t.shape), t.detach().numpy().tobytes()]) for n, t in a] for a in args
                )
            return [getattr(self.worker, method)(*args)]

        def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
            self.calls.append("reset_prefix_cache")
            self.prefix_cache.clear()
            return True

        def sleep(self, level=1, mode="abort"):
            self.calls.append(f"sleep({level})")
            self.asleep = {"weights", "kv_cache"}
            if level == 2:
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.fill_(float("nan"))  # discarded

        def wake_up(self, tags=None):
            self.calls.append(f"wake_up({','.join(tags) if tags else 'all'})")
            self.asleep -= set(tags or ["weights", "kv_cache"])
            return not self.asleep


def _engines(tmp_path):
    from base_model import save_pretrained

    torch.manual_seed(0)
    policy = randomize_biases(QwenForCausalLM(tiny_config())).eval()
    native = NativeEngine(policy.config, pad_id=0)
    native.load_weights(policy.named_parameters())
    save_pretrained(QwenForCausalLM(policy.config), tmp_path / "model")  # vLLM starts from another checkpoint
    vllm_engine = VLLMEngine(tmp_path / "model", vllm_module=FakeVLLM)
    vllm_engine.load_weights(policy.named_parameters())
    return policy, {"native": native, "vllm": vllm_engine}


@pytest.mark.parametrize("kind", ["native", "vllm"])
def test_engine_protocol(kind, tmp_path):
    policy, engines = _engines(tmp_path)
    engine = engines[kind]
    prompts = [[5, 6, 7], [8, 9]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    out = engine.generate(prompts, greedy)
    assert len(out) == 2 and all(len(r.token_ids) == len(r.logprobs) == 6 and r.finish_reason == "length" for r in out)
    with torch.no_grad():  # logprobs are the policy's own
        full = policy(torch.tensor([prompts[0] + out[0].token_ids])).logits[0].log_softmax(-1)
    expected = [full[2 + j, t].item() for j, t in enumerate(out[0].token_ids)]
    assert torch.allclose(torch.tensor(out[0].logprobs), torch.tensor(expected), atol=1e-5)
    probe = prompts[0] + out[0].token_ids
    assert torch.allclose(torch.tensor(engine.prompt_logprobs(probe)), torch.tensor(expected[:0] + [
        full[j, t].item() for j, t in enumerate(probe[1:])]), atol=1e-5)  # fmt: skip
    stop = out[0].token_ids[2]
    first = out[0].token_ids.index(stop)  # greedy decoding may have produced it before
    stopped = engine.generate([prompts[0]], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=(stop,)))
    assert stopped[0].token_ids == out[0].token_ids[: first + 1] and stopped[0].finish_reason == "stop"
    # new weights change what the engine samples (vLLM: the prefix cache is dropped with the old weights)
    changed = {n: p + 0.5 * torch.randn_like(p) for n, p in policy.named_parameters()}
    engine.load_weights(changed.items())
    assert engine.generate(prompts, greedy)[0].token_ids != out[0].token_ids


def test_native_engine_samples_in_waves_as_in_one_batch():
    """Rows split into waves (shortest prompts first) come back in the prompts' order with the tokens, log-
    probabilities and finish reasons of one batch: PPO's per-row seeds make a row's draws its own."""
    torch.manual_seed(0)
    policy = randomize_biases(QwenForCausalLM(tiny_config())).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 200, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (11,), generator=g)]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, stop_token_ids=(7, 9),
                             row_seeds=[100 + i for i in range(len(prompts))])  # fmt: skip
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    for sampling in (sampled, greedy):
        whole = NativeEngine.sharing(policy, pad_id=0).generate(prompts, sampling)
        streamed: dict[int, list[int]] = {}
        engine = NativeEngine.sharing(policy, pad_id=0, max_rows=3)
        waves = engine.generate(prompts, sampling, on_token=lambda i, t: streamed.setdefault(i, []).append(t))
        assert (engine.waves, engine.wave_rows) == (4, 3)
        assert [r.token_ids for r in waves] == [r.token_ids for r in whole]
        assert [r.finish_reason for r in waves] == [r.finish_reason for r in whole]
        for a, b in zip(waves, whole):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert {i: t for i, t in streamed.items()} == {i: r.token_ids for i, r in enumerate(whole)}
        if sampling is sampled:  # both endings, in rows of different waves
            assert {r.finish_reason for r in whole} == {"stop", "length"}
    one = NativeEngine.sharing(policy, pad_id=0)
    one.generate(prompts, greedy)
    assert (one.waves, one.wave_rows) == (1, len(prompts))  # the CPU's default: every row at once
    five = NativeEngine.sharing(policy, pad_id=0, max_rows=5)
    assert [r.token_ids for r in five.generate(prompts, greedy)] == [r.token_ids for r in whole]
    assert (five.waves, five.wave_rows) == (3, 4)  # 11 rows, at most 5 a wave: 4 + 4 + 3, not 5 + 5 + 1
    # one shared seed: each wave draws from its own (seed + wave), so the first rows of two waves of the same
    # prompt differ (with one seed for all they would draw the same numbers)
    same = [prompts[0]] * 4
    shared = NativeEngine.sharing(policy, pad_id=0, max_rows=2).generate(
        same, SamplingParams(max_new_tokens=12, seed=5)
    )
    assert shared[0].token_ids != shared[2].token_ids
    with pytest.raises(ValueError, match="max_rows=0"):
        NativeEngine.sharing(policy, pad_id=0, max_rows=0)


def test_native_engine_on_a_gpu_sizes_its_waves_from_free_memory(monkeypatch):
    """On a CUDA device (stood in for: the sizing reads only the model's device, config and dtype, and the free
    memory) the rows of a wave are those whose estimate fits in MEMORY_FRACTION of the free bytes, at the longest
    prompt; `max_rows` overrides it."""
    from base_model.generate import row_bytes
    from ppo.rollout import native

    policy = QwenForCausalLM(tiny_config())
    engine = NativeEngine.sharing(policy, pad_id=0)
    engine.model = SimpleNamespace(device=torch.device("cuda", 0), config=policy.config, dtype=torch.bfloat16)
    asked = []
    per_row = row_bytes(policy.config, torch.bfloat16, 30, 16)  # at the longest prompt, 30 tokens
    monkeypatch.setattr(
        native, "free_device_bytes", lambda device: asked.append(device) or int(7.5 * per_row / native.MEMORY_FRACTION)
    )
    prompts = [[1] * 10, [2] * 30, [3] * 5]
    assert engine.rows_per_wave(prompts, 16) == 7 and asked == [torch.device("cuda", 0)]
    assert engine.rows_per_wave([[1] * 10], 16) > 7  # a shorter longest prompt: more rows
    engine.max_rows = 2
    assert engine.rows_per_wave(prompts, 16) == 2 and len(asked) == 2


def test_vllm_weights_reach_the_worker_as_tensors_in_buckets(tmp_path):
    """#1: an in-process engine core (external_launcher), so collective_rpc hands over tensors; a multiprocess
    one would deliver serialised lists, which the worker extension refuses with a message. Buckets by size."""
    policy, engines = _engines(tmp_path)
    engine = engines["vllm"]
    assert engine.llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert engine.llm.kwargs["worker_extension_cls"] == "ppo.rollout.vllm_engine.WorkerExtension"
    sizes = [p.numel() * p.element_size() for p in policy.parameters()]
    engine.bucket_bytes = sum(sizes) // 3
    engine.llm.calls.clear()
    engine.load_weights(policy.named_parameters())
    rpcs = engine.llm.calls.count("load_named_weights")
    assert 2 <= rpcs <= 4 and engine.llm.calls[-1] == "reset_prefix_cache"
    assert engine.syncs == 2 and engine.last_sync_s > 0
    engine.llm.multiprocess = True
    with pytest.raises(TypeError, match="external_launcher"):
        engine.load_weights(policy.named_parameters())


def test_vllm_sleeps_at_level_2_and_never_samples_discarded_weights(tmp_path):
    """#3: sleep discards weights and KV cache; a sync wakes the weights alone and loads them; the next generate
    wakes the KV cache. Sampling after sleep without a sync is refused."""
    policy, engines = _engines(tmp_path)
    engine = engines["vllm"]
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    before = engine.generate([[3, 4]], greedy)[0].token_ids
    engine.llm.calls.clear()
    engine.sleep()
    with pytest.raises(RuntimeError, match="discarded by sleep"):
        engine.generate([[3, 4]], greedy)
    engine.load_weights(policy.named_parameters())
    assert engine.generate([[3, 4]], greedy)[0].token_ids == before
    calls = engine.llm.calls
    assert calls[:2] == ["sleep(2)", "wake_up(weights)"] and calls.index("wake_up(kv_cache)") < calls.index("generate")


def test_vllm_padded_vocabulary_is_never_sampled_and_finish_reasons_are_kept(tmp_path):
    """#6: ids past the tokenizer get vLLM's lowest logit bias; abort/repetition are not recorded as length."""
    _, engines = _engines(tmp_path)
    engine = engines["vllm"]
    hot = SamplingParams(max_new_tokens=40, temperature=5.0, row_seeds=list(range(8)), vocab_limit=250)
    rollouts = engine.generate([[1, 2]] * 8, hot)
    assert max(t for r in rollouts for t in r.token_ids) < 250
    params = engine.sampling_params(hot, 8)
    assert set(params[0].logit_bias) == set(range(250, 300)) and engine.vocab_size == 300
    done = SimpleNamespace(token_ids=[1], logprobs=[{1: SimpleNamespace(logprob=-0.1)}], finish_reason="abort")
    engine.llm.generate = lambda *a, **k: [SimpleNamespace(outputs=[done])]
    assert engine.generate([[1]], SamplingParams(max_new_tokens=1))[0].finish_reason == "abort"


def test_vllm_version_is_checked_at_start_up(tmp_path):
    from ppo.rollout.vllm_engine import VLLMVersionError

    _engines(tmp_path)
    old = type("OldVLLM", (FakeVLLM,), {"__version__": "0.11.2"})
    with pytest.raises(VLLMVersionError, match=r"vLLM 0.11.2 is installed.*0.33"):
        VLLMEngine(tmp_path / "model", vllm_module=old)


def test_vllm_adapter_times_out_and_then_refuses_calls(tmp_path):
    _engines(tmp_path)
    engine = VLLMEngine(tmp_path / "model", vllm_module=FakeVLLM)
    engine.timeout_s = 0.2  # after start-up, whose model load may itself take longer on a busy machine
    engine.llm.generate = lambda *a, **k: threading.Event().wait(5)
    with pytest.raises(VLLMTimeout, match="generating rollouts within 0 s"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    with pytest.raises(VLLMTimeout, match="unusable: generating rollouts did not finish"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))  # the stuck call is never joined again

    def rpc_timeout(method, timeout=None, args=(), kwargs=None):
        raise TimeoutError(f"RPC call to {method} timed out.")

    engine = VLLMEngine(tmp_path / "model", vllm_module=FakeVLLM, timeout_s=7)
    engine.llm.collective_rpc = rpc_timeout  # vLLM's own timeout on collective_rpc
    with pytest.raises(VLLMTimeout, match="loading weights"):
        engine.load_weights([("lm_head.weight", torch.zeros(3))])


def test_ppo_with_vllm_sleeps_syncs_in_buckets_checks_the_sync_and_stops_on_a_wrong_one(tmp_path, monkeypatch):
    """PPO's loop with the vLLM engine (the double, loaded as `vllm`): the engine sleeps while the policy trains,
    each sync is timed and checked on the probe sequence, and a corrupted sync stops the run with a message."""
    import types

    from align.core.config import load_config
    from base_model import QwenTokenizer, save_pretrained
    from conftest import ROOT
    from ppo.models import SyncCheckError
    from ppo.train import PPOConfig, main
    from rm.model import RewardModel

    tokenizer = QwenTokenizer.from_bytes()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=-(-len(tokenizer) // 64) * 64, seq_length=512)
    save_pretrained(QwenForCausalLM(config), tmp_path / "policy", tokenizer=tokenizer)
    RewardModel(QwenForCausalLM(config), "end_token", tokenizer.eod_id).save(tmp_path / "rm", tokenizer=tokenizer)
    module = types.ModuleType("vllm")
    module.__version__, module.LLM, module.SamplingParams = "0.33.0", FakeVLLM.LLM, FakeVLLM.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeVLLM.started.clear()

    gsm8k = ROOT / "tests" / "fixtures" / "public_rows" / "gsm8k_train_rows.jsonl"

    def run(out, *extra):
        overrides = [f"models.policy={tmp_path / 'policy'}", f"models.reward={tmp_path / 'rm'}", "data.ptx=null",
                     "data.eval_prompts=null", "ppo.engine=vllm", "ppo.iterations=2", "ppo.max_new_tokens=8",
                     "train.eval_every=0", "train.save_every=0", "train.peak_tflops=1", f"out_dir={tmp_path / out}",
                     "ppo.sync_bucket_mb=0.05", f'eval.benchmarks=[{{name: gsm8k, data: "{gsm8k}", max_new_tokens: 4}}]',
                     *extra]  # fmt: skip
        return main(load_config(PPOConfig, ROOT / "configs" / "ppo" / "tiny.yaml", overrides))

    run("good", "train.eval_every=1")
    rows = [json.loads(l) for l in (tmp_path / "good" / "metrics.jsonl").read_text().splitlines()]
    bench = [r["eval/bench/gsm8k"] for r in rows if "eval/bench/gsm8k" in r]  # steps 0, 1, 2, from the engine
    assert len(bench) == 3 and all(b in (0.0, 0.5, 1.0) for b in bench)
    train = [r for r in rows if "train/kl" in r]
    assert all(r["train/time/weight_sync_s"] > 0 and r["train/sync_logprob_diff"] < 1e-4 for r in train)
    calls = FakeVLLM.started[-1].calls
    first_sync = calls.index("sleep(2)")
    assert calls[first_sync + 1] == "wake_up(weights)" and calls.count("load_named_weights") >= 2 * 2
    assert calls.index("reset_prefix_cache", first_sync) < calls.index("wake_up(kv_cache)", first_sync)
    monkeypatch.setattr(FakeVLLM, "corrupt", True)
    with pytest.raises(SyncCheckError, match="weight sync check failed after step 1"):
        run("corrupted")


def test_vllm_adapter_matches_vllm_signatures():
    vllm = pytest.importorskip("vllm", reason="vLLM runs in its own environment: scripts/vllm_test_env.sh")
    llm_params = inspect.signature(vllm.LLM.generate).parameters
    assert {"prompts", "sampling_params", "use_tqdm"} <= set(llm_params)
    assert {"collective_rpc", "sleep", "wake_up", "reset_prefix_cache"} <= set(dir(vllm.LLM))
    sp = inspect.signature(vllm.SamplingParams).parameters
    assert {"n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "logprobs", "prompt_logprobs",
            "seed", "detokenize", "logit_bias"} <= set(sp)  # fmt: skip
    assert "worker_extension_cls" in inspect.signature(vllm.EngineArgs).parameters


def test_nan_guard_step_leaves_weights_unchanged():
    from align.core.engine import TrainEngine

    torch.manual_seed(0)
    model = QwenForCausalLM(tiny_config())
    engine = TrainEngine(model, OptimConfig(lr=1e-2, weight_decay=0.1), DeepSpeedSection(), total_steps=10)
    ids = torch.randint(0, 300, (1, 8))
    engine.backward(engine.forward(ids).logits.mean())
    engine.step()  # a normal update, so Adam has momentum
    before = [p.detach().clone() for p in engine.module.parameters()]
    bad = engine.forward(ids).logits.mean() * float("nan")
    assert not torch.isfinite(bad)
    engine.backward(engine.zero_loss())
    stats = engine.step(skip=True)
    assert stats["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    engine.backward(engine.forward(ids).logits.mean())
    assert engine.step()["lr"] > 0  # the schedule carries on
