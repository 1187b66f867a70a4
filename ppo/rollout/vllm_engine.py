"""The one file that imports vLLM: a colocated vLLM rollout engine.

vLLM runs in the training process on the same GPU (`enable_sleep_mode` lets it release its memory while the
policy trains). After each policy update the trainer streams the weights in, one Hugging Face-named tensor at a
time, gathered from ZeRO-3 shards by the caller; vLLM's workers receive them through `collective_rpc` into
`WorkerExtension.load_named_weights`, which calls the model's own `load_weights`. Every call into vLLM runs under
a timeout and fails with a message that says what was being waited for, instead of hanging.

What has run where: the adapter is tested on CPU against a test double that follows vLLM's API, and against
vLLM's real signatures where `vllm` imports. It has not been run against a real vLLM on a GPU here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from base_model.generate import SamplingParams
from ppo.rollout.engine import Rollout


class WorkerExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`)."""

    def load_named_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        self.model_runner.model.load_weights(weights=named_tensors)
        return len(named_tensors)


class VLLMTimeout(RuntimeError):
    pass


class VLLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        seed: int = 0,
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = True,
        timeout_s: float = 600.0,
        llm=None,
        vllm_module=None,
    ) -> None:
        if vllm_module is None:
            import vllm as vllm_module
        self.vllm = vllm_module
        self.timeout_s = timeout_s
        self.sleeping = False
        self.llm = (
            llm
            if llm is not None
            else self._call(
                "starting vLLM",
                lambda: vllm_module.LLM(
                    model=str(model_dir),
                    seed=seed,
                    gpu_memory_utilization=gpu_memory_utilization,
                    tensor_parallel_size=tensor_parallel_size,
                    enable_sleep_mode=enable_sleep_mode,
                    worker_extension_cls="ppo.rollout.vllm_engine.WorkerExtension",
                    skip_tokenizer_init=True,
                ),
            )
        )

    def _call(self, what: str, fn: Callable):
        """Run fn in a helper thread; give up after the timeout with a message naming what was awaited."""
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
            raise VLLMTimeout(
                f"vLLM did not finish {what} within {self.timeout_s:.0f} s; the engine may be "
                "deadlocked (check GPU memory and that every rank reached this call)"
            )
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def sampling_params(self, sampling: SamplingParams, n_prompts: int) -> list:
        seeds = sampling.row_seeds or [sampling.seed] * n_prompts
        return [
            self.vllm.SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                logprobs=0,
                seed=seed,
                detokenize=False,
            )
            for seed in seeds
        ]

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        if self.sleeping:
            self.wake_up()
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
            reason = "stop" if completion.finish_reason == "stop" else "length"
            rollouts.append(Rollout(tokens, logprobs, reason))
        return rollouts

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.sleeping:
            self.wake_up()
        for name, tensor in named_tensors:
            self._call(
                f"loading weight {name}",
                lambda: self.llm.collective_rpc("load_named_weights", args=([(name, tensor)],)),
            )

    def sleep(self) -> None:
        """Release vLLM's GPU memory (weights and KV cache) while the policy trains."""
        self._call("going to sleep", lambda: self.llm.sleep(level=1))
        self.sleeping = True

    def wake_up(self) -> None:
        self._call("waking up", lambda: self.llm.wake_up())
        self.sleeping = False
