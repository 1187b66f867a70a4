"""Rollout engines: the native engine and the vLLM adapter pass the same protocol tests; the NaN-guard step."""

import inspect
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
    """Follows vLLM's public API (LLM.generate with TokensPrompt dicts and per-request SamplingParams returning
    RequestOutputs; collective_rpc into the worker extension; sleep/wake_up), backed by our own model."""

    class SamplingParams:
        def __init__(
            self,
            n=1,
            temperature=1.0,
            top_p=1.0,
            top_k=-1,
            max_tokens=16,
            stop_token_ids=None,
            logprobs=None,
            seed=None,
            detokenize=True,
        ):
            self.__dict__.update(locals())
            del self.__dict__["self"]

    class LLM:
        def __init__(self, model):
            self.worker = type("Worker", (WorkerExtension,), {})()
            self.worker.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load))
            self.model, self.calls, self.asleep = model, [], False

        def _load(self, weights):
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in weights:
                    params[name].copy_(t)

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            assert not self.asleep, "generate while asleep"
            self.calls.append("generate")
            outs = []
            for prompt, sp in zip(prompts, sampling_params):
                ours = SamplingParams(
                    max_new_tokens=sp.max_tokens,
                    temperature=sp.temperature,
                    top_p=sp.top_p,
                    top_k=max(sp.top_k, 0),
                    stop_token_ids=tuple(sp.stop_token_ids),
                    seed=sp.seed,
                )
                g = generate(self.model, [prompt["prompt_token_ids"]], ours)
                steps = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(g.token_ids[0], g.logprobs[0])]
                completion = SimpleNamespace(
                    token_ids=g.token_ids[0], logprobs=steps, finish_reason=g.finish_reasons[0]
                )
                outs.append(SimpleNamespace(outputs=[completion]))
            return outs

        def collective_rpc(self, method, args=()):
            self.calls.append(method)
            return [getattr(self.worker, method)(*args)]

        def sleep(self, level=1):
            self.asleep = True

        def wake_up(self):
            self.asleep = False


def _engines():
    torch.manual_seed(0)
    policy = randomize_biases(QwenForCausalLM(tiny_config())).eval()
    native = NativeEngine(policy.config, pad_id=0)
    native.load_weights(policy.named_parameters())
    fake_model = QwenForCausalLM(policy.config).eval()
    fake = FakeVLLM.LLM(fake_model)
    vllm_engine = VLLMEngine("unused", llm=fake, vllm_module=FakeVLLM)
    vllm_engine.load_weights(policy.named_parameters())
    return policy, {"native": native, "vllm": vllm_engine}


@pytest.mark.parametrize("kind", ["native", "vllm"])
def test_engine_protocol(kind):
    policy, engines = _engines()
    engine = engines[kind]
    prompts = [[5, 6, 7], [8, 9]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    out = engine.generate(prompts, greedy)
    assert len(out) == 2 and all(len(r.token_ids) == len(r.logprobs) == 6 and r.finish_reason == "length" for r in out)
    with torch.no_grad():  # logprobs are the policy's own
        full = policy(torch.tensor([prompts[0] + out[0].token_ids])).logits[0].log_softmax(-1)
    expected = [full[2 + j, t].item() for j, t in enumerate(out[0].token_ids)]
    assert torch.allclose(torch.tensor(out[0].logprobs), torch.tensor(expected), atol=1e-5)
    stop = out[0].token_ids[2]
    first = out[0].token_ids.index(stop)  # greedy decoding may have produced it before
    stopped = engine.generate([prompts[0]], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=(stop,)))
    assert stopped[0].token_ids == out[0].token_ids[: first + 1] and stopped[0].finish_reason == "stop"
    # new weights change what the engine samples
    changed = {n: p + 0.5 * torch.randn_like(p) for n, p in policy.named_parameters()}
    engine.load_weights(changed.items())
    assert engine.generate(prompts, greedy)[0].token_ids != out[0].token_ids


def test_vllm_adapter_calls_and_sleep():
    _, engines = _engines()
    engine = engines["vllm"]
    engine.sleep()
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, temperature=0))  # wakes up first
    assert not engine.llm.asleep and "load_named_weights" in engine.llm.calls
    params = engine.sampling_params(SamplingParams(max_new_tokens=3, top_k=0, row_seeds=[4, 5]), 2)
    assert [p.seed for p in params] == [4, 5] and params[0].top_k == -1 and params[0].logprobs == 0


def test_vllm_adapter_times_out_instead_of_hanging():
    engine = VLLMEngine(
        "unused",
        llm=SimpleNamespace(generate=lambda *a, **k: threading.Event().wait(5)),
        vllm_module=FakeVLLM,
        timeout_s=0.2,
    )
    with pytest.raises(VLLMTimeout, match="generating rollouts within 0 s"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))


def test_vllm_adapter_matches_vllm_signatures():
    vllm = pytest.importorskip("vllm", reason="vLLM is in the [gpu] extra and needs CUDA; not installable here")
    llm_params = inspect.signature(vllm.LLM.generate).parameters
    assert {"prompts", "sampling_params", "use_tqdm"} <= set(llm_params)
    assert {"collective_rpc", "sleep", "wake_up"} <= set(dir(vllm.LLM))
    sp = inspect.signature(vllm.SamplingParams).parameters
    assert {
        "n",
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "stop_token_ids",
        "logprobs",
        "seed",
        "detokenize",
    } <= set(sp)
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
