"""The vLLM adapter against vLLM 0.33's real classes, in the environment `scripts/vllm_test_env.sh` makes (vLLM and
torch 2.14 beside the project; vLLM's engine cannot start without CUDA, its classes import on the CPU). In the
main environment, where vLLM is not installed, these tests are skipped with that reason.

What the real package shows: the weight-sync message through vLLM's own msgpack serialisation (what a
multiprocess engine core receives); the external launcher turning that off and placing each rank's engine on its
LOCAL_RANK device; the worker extension resolved and checked as vLLM does; SamplingParams built for every sampling
setting the PPO config allows; the signatures the adapter calls.
"""

import inspect
import itertools
import json
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM runs in its own environment: bash scripts/vllm_test_env.sh")

from base_model.generate import SamplingParams  # noqa: E402
from ppo.rollout.vllm_engine import SUPPORTED_VLLM, VLLMEngine, WorkerExtension, check_version  # noqa: E402


@pytest.fixture
def engine(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    return VLLMEngine(tmp_path, llm=object(), vllm_module=vllm)


def test_the_installed_vllm_is_the_supported_one():
    assert vllm.__version__.startswith(SUPPORTED_VLLM)
    check_version(vllm.__version__)


def test_a_multiprocess_engine_core_would_receive_serialised_tensors():
    """#1: vLLM's own encoder and decoder turn each tensor into [dtype, shape, buffer]; the worker extension
    refuses that with a message instead of loading garbage."""
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    bucket = [("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.zeros(3, 4))]
    (received,) = MsgpackDecoder().decode(MsgpackEncoder().encode((bucket,)))
    assert not isinstance(received[0][1], torch.Tensor) and received[0][1][:2] == ["float32", [4]]
    with pytest.raises(TypeError, match="external_launcher"):
        WorkerExtension().load_named_weights(received)


def test_the_external_launcher_runs_the_engine_in_process_on_this_ranks_device(monkeypatch):
    """#1 and #4: the backend the adapter asks for turns vLLM's engine-core multiprocessing off (tensors pass as
    they are) and takes the rank and device from torchrun's variables."""
    from vllm.config import ParallelConfig
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    kwargs = VLLMEngine.engine_kwargs("model", 0, 0.4, 1, True)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    ParallelConfig(distributed_executor_backend=kwargs["distributed_executor_backend"])
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ExecutorWithExternalLauncher._distributed_args(None) == ("env://", 3, 1)
    engine_args = set(inspect.signature(vllm.EngineArgs).parameters)
    assert set(kwargs) <= engine_args, set(kwargs) - engine_args


def test_the_worker_extension_resolves_and_fits_the_gpu_worker():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.gpu_worker import Worker

    ext = resolve_obj_by_qualname(VLLMEngine.engine_kwargs("m", 0, 0.4, 1, True)["worker_extension_cls"])
    assert ext is WorkerExtension
    clashes = [a for a in dir(ext) if not a.startswith("__") and hasattr(Worker, a)]  # what vLLM asserts
    assert not clashes


def test_sampling_params_for_every_setting_the_config_allows(engine):
    """#6 included: the padded vocabulary (151851 → 151936) is biased away, within vLLM's bounds."""
    settings = itertools.product((0.0, 0.7, 1.0), (0.9, 1.0), (0, 50), ((), (151645, 151643)), (None, 151851))
    for temperature, top_p, top_k, stop, limit in settings:
        ours = SamplingParams(max_new_tokens=16, temperature=temperature, top_p=top_p, top_k=top_k,
                              stop_token_ids=stop, row_seeds=[1, 2], vocab_limit=limit)  # fmt: skip
        for p in engine.sampling_params(ours, 2):  # the real constructor validates each
            assert isinstance(p, vllm.SamplingParams) and p.max_tokens == 16 and p.logprobs == 0
            assert p.top_k == (top_k if temperature else 0) and list(p.stop_token_ids) == list(stop)  # greedy: 0
            assert (set(p.logit_bias or {}) == set(range(151851, 151936))) == (limit is not None)
    probe = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
    assert probe.prompt_logprobs == 0


def test_the_calls_the_adapter_makes_match_vllm():
    params = lambda f: set(inspect.signature(f).parameters)
    assert {"prompts", "sampling_params", "use_tqdm"} <= params(vllm.LLM.generate)
    assert {"method", "timeout", "args"} <= params(vllm.LLM.collective_rpc)
    assert {"level"} <= params(vllm.LLM.sleep) and {"tags"} <= params(vllm.LLM.wake_up)
    assert "reset_prefix_cache" in dir(vllm.LLM)
    from vllm.v1.engine import FinishReason

    assert [str(r) for r in FinishReason] == ["stop", "length", "abort", "error", "repetition"]


def test_align_eval_answers_through_vllm_with_its_real_sampling_params(tmp_path):
    """`align eval --engine vllm`: the in-process answerer builds vLLM's real SamplingParams (greedy for one sample,
    seeded sampling for several), sends our token ids and decodes what comes back with our tokenizer. The engine
    itself cannot start here, so a stand-in `LLM` records the call and answers."""
    from types import SimpleNamespace

    from align.eval.harness import EngineAnswerer, evaluate
    from base_model import QwenTokenizer

    tok = QwenTokenizer.from_bytes()
    tok.save(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": len(tok) + 10}))
    calls = []

    class RecordingLLM:
        def generate(self, prompts, sampling_params, use_tqdm):
            calls.append((prompts, sampling_params))
            answer = tok.encode("The answer is 72.") + [tok.im_end_id]
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=answer, logprobs=[{t: SimpleNamespace(
                logprob=0.0)} for t in answer], finish_reason="stop")]) for _ in prompts]  # fmt: skip

    answerer = EngineAnswerer.vllm(str(tmp_path / "model"), 32, samples=2, llm=RecordingLLM(), vllm_module=vllm)
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "48 + 24?", "answer": "48 + 24 = 72\n#### 72"}) + "\n")
    summary = evaluate("gsm8k", str(gsm8k), tmp_path / "out", answerer=answerer, samples=2, log=lambda *_: 0)
    assert summary["accuracy"] == 1.0 and summary["samples"] == 2
    prompts, params = calls[0]
    assert all(isinstance(p, vllm.SamplingParams) for p in params) and len(params) == len(prompts) == 2
    assert prompts[0]["prompt_token_ids"][:1] == [tok.im_start_id]
    assert {p.temperature for p in params} == {0.8} and len({p.seed for p in params}) == 2
    assert params[0].stop_token_ids == [tok.im_end_id, tok.eod_id] and params[0].max_tokens == 32
    assert min(params[0].logit_bias) == len(tok)  # the padded ids cannot be sampled


def test_stop_strings_reach_vllm_as_its_stop_parameter(engine):
    """A ReAct step stops at `Observation:`: vLLM matches stop strings on text, so they turn detokenizing on."""
    params = engine.sampling_params(SamplingParams(max_new_tokens=64, stop_strings=("Observation:",)), 1)[0]
    assert isinstance(params, vllm.SamplingParams)
    assert params.stop == ["Observation:"] and params.detokenize and not params.include_stop_str_in_output
    plain = engine.sampling_params(SamplingParams(max_new_tokens=64), 1)[0]
    assert not plain.stop and not plain.detokenize
