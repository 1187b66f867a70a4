"""The native rollout engine: our own batched KV-cache sampler (CPU or GPU).

It samples either from the training policy's own module (`NativeEngine.sharing`, when the weights are whole on
every rank: ZeRO-0/1/2), so nothing is copied and `load_weights` has nothing to do, or from a private copy of the
policy that `load_weights` refreshes (ZeRO-3, where each rank holds only a shard).

A call's rows are sampled in equal waves of at most `max_rows` rows (by default, every row at once on the CPU and
as many as fit in `MEMORY_FRACTION` of the GPU's free memory on a GPU: `base_model.generate.rows_that_fit`), the
shortest prompts first so that each wave pads little. With per-row seeds (`SamplingParams.row_seeds`, as PPO
samples) a row's tokens do not depend on the waves; with one shared seed each wave draws from seed + wave."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from base_model import QwenConfig, QwenForCausalLM
from base_model.generate import SamplingParams, free_device_bytes, generate, rows_that_fit
from ppo.rollout.engine import Rollout

MEMORY_FRACTION = 0.9  # of a GPU's free memory that a wave's KV cache, prefill and logits may take


class NativeEngine:
    def __init__(
        self,
        config: QwenConfig,
        pad_id: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        model: QwenForCausalLM | None = None,
        max_rows: int | None = None,
    ) -> None:
        """A private copy of the policy (uninitialised until `load_weights`), or `model` itself when given.
        `max_rows`: rows sampled at once (None: see the module's docstring)."""
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: expected at least 1 row per wave")
        self.shares_weights = model is not None
        if model is None:
            with torch.device("meta"):
                model = QwenForCausalLM(config)
            model = model.to_empty(device=device).to(dtype).eval()
            model.tie_weights()
        self.model = model
        self.pad_id = pad_id
        self.detokenize = None  # set to the tokenizer's decode to sample with stop strings
        self._params = dict(self.model.named_parameters())
        self.max_rows = max_rows
        self.waves = 0  # waves of the last call
        self.wave_rows = 0  # and their most rows

    @classmethod
    def sharing(cls, model: QwenForCausalLM, pad_id: int, max_rows: int | None = None) -> "NativeEngine":
        """An engine that samples from `model` itself: the training policy's current weights, always."""
        return cls(model.config, pad_id, model=model, max_rows=max_rows)

    def rows_per_wave(self, prompt_ids: list[list[int]], new_tokens: int) -> int:
        """Rows sampled at once for these prompts: `max_rows` when set, else all of them on the CPU, and on a GPU as
        many as fit in `MEMORY_FRACTION` of its free memory (`rows_that_fit`, at the longest prompt)."""
        if self.max_rows is not None:
            return self.max_rows
        device = self.model.device
        if device.type != "cuda":
            return len(prompt_ids)
        free = int(MEMORY_FRACTION * free_device_bytes(device))
        return rows_that_fit(self.model.config, self.model.dtype, max(map(len, prompt_ids)), new_tokens, free)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, on_token=None) -> list[Rollout]:
        """`sampling.stop_strings` need `self.detokenize` (the tokenizer's decode); `on_token(row, id)` streams.
        Rollouts come back in the prompts' order, however the rows were split into waves."""
        n = len(prompt_ids)
        if n == 0:
            return []
        waves = -(-n // self.rows_per_wave(prompt_ids, sampling.max_new_tokens))
        rows = -(-n // waves)  # waves of equal size, none above the limit
        self.waves, self.wave_rows = waves, rows
        if rows == n:
            return self._generate(prompt_ids, sampling, on_token)
        order = sorted(range(n), key=lambda i: len(prompt_ids[i]))  # stable: a prompt's samples stay together
        out: list[Rollout | None] = [None] * n
        for wave, start in enumerate(range(0, n, rows)):
            idx = order[start : start + rows]
            part = replace(
                sampling,
                row_seeds=None if sampling.row_seeds is None else [sampling.row_seeds[i] for i in idx],
                seed=None if sampling.seed is None else sampling.seed + wave,
            )
            forward = None if on_token is None else (lambda row, token, idx=idx: on_token(idx[row], token))
            for i, rollout in zip(idx, self._generate([prompt_ids[i] for i in idx], part, forward)):
                out[i] = rollout
        return out

    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, on_token) -> list[Rollout]:
        out = generate(self.model, prompt_ids, sampling, pad_id=self.pad_id, detokenize=self.detokenize,
                       on_token=on_token)  # fmt: skip
        return [Rollout(t, lp, r) for t, lp, r in zip(out.token_ids, out.logprobs, out.finish_reasons)]

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t ≥ 1 under the engine's weights (the sync check's probe)."""
        t = torch.tensor([ids], device=next(self.model.parameters()).device)
        return self.model(t, token_logprobs=True).token_logprobs[0].tolist()

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen = set()
        for name, tensor in named_tensors:
            if name not in self._params:
                raise KeyError(f"native engine: no parameter named {name!r}")
            if not self.shares_weights:
                self._params[name].copy_(tensor)
            seen.add(name)
        missing = set(self._params) - seen
        if missing and not (self.model.config.tie_word_embeddings and missing == {"lm_head.weight"}):
            raise KeyError(f"native engine: weights not updated for {sorted(missing)[:3]}")
