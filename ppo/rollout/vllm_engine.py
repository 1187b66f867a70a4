"""The one file that imports vLLM: a colocated vLLM rollout engine, written against vLLM 0.33.

How it is wired, and the vLLM 0.33 source each choice rests on:

- **In-process engine, one per rank.** The engine is built with `distributed_executor_backend="external_launcher"`
  (`vllm/v1/executor/uniproc_executor.py::ExecutorWithExternalLauncher`): one worker in this process, on this
  rank's `LOCAL_RANK` device, set up from torchrun's `RANK`/`LOCAL_RANK`/`MASTER_*` variables (`_distributed_args`),
  which is how colocated RLHF trainers (TRL's colocate mode) run vLLM beside DeepSpeed. That backend turns off
  `VLLM_ENABLE_V1_MULTIPROCESSING` (`vllm/config/parallel.py`, `ParallelConfig.__post_init__`), so the engine core
  runs in this process and `collective_rpc` hands the worker our tensors as they are. With the default
  multiprocess engine core the message would cross vLLM's `MsgpackEncoder`/`MsgpackDecoder`
  (`vllm/v1/serial_utils.py`) and each tensor would arrive as `[dtype, shape, buffer]`.
- **Weight sync in buckets.** `load_weights` sends the policy's Hugging Face-named tensors in buckets of about
  `bucket_mb` through `collective_rpc("load_named_weights", timeout=…)` into `WorkerExtension` (mixed into the
  worker by `worker_extension_cls`, resolved by `vllm/v1/worker/worker_base.py`), which calls the model's own
  `load_weights`. Then `reset_prefix_cache()`: cached KV blocks were computed with the old weights. The time of
  each sync is kept in `last_sync_s`.
- **Sleep.** While the policy trains the engine sleeps at level 2 (`LLM.sleep`: weights and KV cache discarded);
  a sync wakes the weights alone (`wake_up(tags=["weights"])`) and loads the new ones into them, and the next
  `generate` wakes the KV cache. Generating from discarded weights that were never reloaded is refused.
- **Sampling.** Ids past the tokenizer (vocabulary padding) get a logit bias of -100 (vLLM's bound), so they are
  never sampled; finish reasons are kept as vLLM gives them (`stop`, `length`, `abort`, `error`, `repetition`),
  only `stop` counting as ended.
- **Timeouts.** `collective_rpc` takes vLLM's own timeout. `generate` has none, so it runs in a helper thread;
  after a timeout the engine refuses every further call (the stuck call cannot be cancelled) and the run stops.

What has run where: on CPU, tests use vLLM's real classes where they import (a separate environment,
`scripts/vllm_test_env.sh`) and a test double for the engine itself, which cannot start without CUDA. It has not
been run against a real vLLM engine on a GPU.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from base_model.generate import SamplingParams
from ppo.rollout.engine import Rollout

SUPPORTED_VLLM = ("0.33.",)  # the vLLM releases this adapter was checked against (the [gpu] extra pins them)


class VLLMVersionError(RuntimeError):
    pass


def check_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise VLLMVersionError(
            f"vLLM {version} is installed; this rollout engine is written and tested against vLLM "
            f"{', '.join(v + 'x' for v in SUPPORTED_VLLM)} (pip install 'vllm>=0.33,<0.34'), or use ppo.engine=native"
        )


def load_vllm(vllm_module=None):
    """The `vllm` module (or the one given, in tests), checked to be a supported version."""
    if vllm_module is None:
        try:
            import vllm as vllm_module
        except ImportError as e:
            raise RuntimeError("vLLM is not installed: pip install '.[gpu]' on a machine with CUDA") from e
    check_version(getattr(vllm_module, "__version__", "unknown"))
    return vllm_module


class WorkerExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`)."""

    def load_named_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        if named_tensors and not isinstance(named_tensors[0][1], torch.Tensor):
            raise TypeError(
                "load_named_weights received serialised tensors: the engine core runs in another process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=1); build the engine with distributed_executor_backend="
                "'external_launcher'"
            )
        self.model_runner.model.load_weights(weights=named_tensors)
        return len(named_tensors)


class VLLMTimeout(RuntimeError):
    pass


def padded_vocab_size(model_dir: str | Path) -> int | None:
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text())["vocab_size"] if path.exists() else None


class VLLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        seed: int = 0,
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = True,
        timeout_s: float = 600.0,
        bucket_mb: float = 256.0,
        llm=None,
        vllm_module=None,
    ) -> None:
        vllm_module = load_vllm(vllm_module)
        self.vllm = vllm_module
        self.timeout_s = timeout_s
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.vocab_size = padded_vocab_size(model_dir)
        self.asleep: set[str] = set()  # what sleep released and wake_up has not restored: weights, kv_cache
        self.weights_discarded = False  # level-2 sleep: the weights must be loaded again before sampling
        self.broken: str | None = None  # set when a call timed out: the engine refuses further calls
        self.syncs = 0
        self.last_sync_s = 0.0
        self.llm = (
            llm
            if llm is not None
            else self._call(
                "starting vLLM",
                lambda: vllm_module.LLM(
                    **self.engine_kwargs(
                        model_dir, seed, gpu_memory_utilization, tensor_parallel_size, enable_sleep_mode
                    )
                ),
            )  # fmt: skip
        )

    @classmethod
    def for_inference(
        cls,
        model_dir: str | Path,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        llm=None,
        vllm_module=None,
    ) -> VLLMEngine:
        """An engine for evaluation or serving, not colocated with training: vLLM's own executor over this machine's
        GPUs (`tensor_parallel_size` of them), no weight syncs. Prompts go in as token ids (no tokenizer in vLLM)."""
        vllm_module = load_vllm(vllm_module)
        if llm is None:
            llm = vllm_module.LLM(model=str(model_dir), seed=seed, tensor_parallel_size=tensor_parallel_size,
                                  gpu_memory_utilization=gpu_memory_utilization, skip_tokenizer_init=True)  # fmt: skip
        return cls(model_dir, seed=seed, llm=llm, vllm_module=vllm_module)

    @staticmethod
    def engine_kwargs(
        model_dir, seed: int, gpu_memory_utilization: float, tensor_parallel_size: int, enable_sleep_mode: bool
    ) -> dict:
        """`vllm.LLM` arguments: an in-process engine on this rank's device (see the module docstring)."""
        return dict(
            model=str(model_dir),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            distributed_executor_backend="external_launcher",
            worker_extension_cls="ppo.rollout.vllm_engine.WorkerExtension",
            skip_tokenizer_init=True,
        )

    def _call(self, what: str, fn: Callable):
        """Run fn in a helper thread; give up after the timeout with a message naming what was awaited. A call
        that timed out cannot be cancelled, so the engine refuses every later call."""
        if self.broken:
            raise VLLMTimeout(f"the vLLM engine is unusable: {self.broken}")
        result: dict = {}

        def target() -> None:
            try:
                result["value"] = fn()
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e

        thread = threading.Thread(target=target, daemon=True, name=f"vllm: {what}")
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self.broken = f"{what} did not finish within {self.timeout_s:.0f} s"
            raise VLLMTimeout(
                f"vLLM did not finish {what} within {self.timeout_s:.0f} s; the engine may be "
                "deadlocked (check GPU memory and that every rank reached this call)"
            )
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def _rpc(self, what: str, method: str, *args):
        if self.broken:
            raise VLLMTimeout(f"the vLLM engine is unusable: {self.broken}")
        try:
            return self.llm.collective_rpc(method, timeout=self.timeout_s, args=args)
        except TimeoutError as e:
            self.broken = f"{what} did not finish within {self.timeout_s:.0f} s"
            raise VLLMTimeout(f"vLLM did not finish {what} within {self.timeout_s:.0f} s") from e

    def sampling_params(self, sampling: SamplingParams, n_prompts: int) -> list:
        seeds = sampling.row_seeds or [sampling.seed] * n_prompts
        bias = None
        if sampling.vocab_limit is not None and self.vocab_size and sampling.vocab_limit < self.vocab_size:
            bias = {i: -100.0 for i in range(sampling.vocab_limit, self.vocab_size)}  # vLLM's lowest bias
        return [
            self.vllm.SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0: no top-k, in vLLM 0.33 as here
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                logprobs=0,
                seed=seed,
                # stop strings are matched on text: vLLM must detokenize (an engine started with its tokenizer)
                detokenize=bool(sampling.stop_strings),
                stop=list(sampling.stop_strings) or None,
                include_stop_str_in_output=False,
                logit_bias=bias,
            )
            for seed in seeds
        ]

    def _ready_to_sample(self) -> None:
        if self.weights_discarded:
            raise RuntimeError(
                "vLLM's weights were discarded by sleep(level=2) and not loaded again: sync the policy's weights "
                "(load_weights) before sampling"
            )
        if self.asleep:
            self._call("waking up", lambda: self.llm.wake_up(tags=sorted(self.asleep)))
            self.asleep.clear()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        self._ready_to_sample()
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        params = self.sampling_params(sampling, len(prompts))
        outputs = self._call(
            "generating rollouts", lambda: self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        )
        rollouts = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [step[token].logprob for token, step in zip(tokens, completion.logprobs)]
            rollouts.append(Rollout(tokens, logprobs, str(completion.finish_reason or "length")))
        return rollouts

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t ≥ 1 under the engine's weights (the sync check's probe)."""
        self._ready_to_sample()
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        out = self._call(
            "scoring the probe sequence",
            lambda: self.llm.generate([{"prompt_token_ids": list(ids)}], sampling_params=params, use_tqdm=False),
        )[0]
        return [step[token].logprob for token, step in zip(ids[1:], out.prompt_logprobs[1:])]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send the weights in buckets of about `bucket_mb`, then drop the prefix cache; `last_sync_s` times it."""
        t0 = time.perf_counter()
        if "weights" in self.asleep:
            self._call("waking the weights", lambda: self.llm.wake_up(tags=["weights"]))
            self.asleep.discard("weights")
        bucket, size, sent = [], 0, 0
        for name, tensor in named_tensors:
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                sent += self._rpc(f"loading weights ({name}…)", "load_named_weights", bucket)[0]
                bucket, size = [], 0
        if bucket:
            sent += self._rpc("loading weights", "load_named_weights", bucket)[0]
        self._call("resetting the prefix cache", lambda: self.llm.reset_prefix_cache())
        self.weights_discarded = False
        self.syncs += 1
        self.last_sync_s = time.perf_counter() - t0

    def sleep(self) -> None:
        """Release vLLM's GPU memory while the policy trains: level 2 discards the weights (the next sync
        replaces them anyway) and the KV cache."""
        self._call("going to sleep", lambda: self.llm.sleep(level=2))
        self.asleep = {"weights", "kv_cache"}
        self.weights_discarded = True

    def wake_up(self) -> None:
        self._ready_to_sample()
