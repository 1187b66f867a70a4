"""The native rollout engine: our own batched KV-cache sampler (CPU or GPU).

It samples either from the training policy's own module (`NativeEngine.sharing`, when the weights are whole on
every rank: ZeRO-0/1/2), so nothing is copied and `load_weights` has nothing to do, or from a private copy of the
policy that `load_weights` refreshes (ZeRO-3, where each rank holds only a shard)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from base_model import QwenConfig, QwenForCausalLM
from base_model.generate import SamplingParams, generate
from ppo.rollout.engine import Rollout


class NativeEngine:
    def __init__(
        self,
        config: QwenConfig,
        pad_id: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        model: QwenForCausalLM | None = None,
    ) -> None:
        """A private copy of the policy (uninitialised until `load_weights`), or `model` itself when given."""
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

    @classmethod
    def sharing(cls, model: QwenForCausalLM, pad_id: int) -> "NativeEngine":
        """An engine that samples from `model` itself: the training policy's current weights, always."""
        return cls(model.config, pad_id, model=model)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, on_token=None) -> list[Rollout]:
        """`sampling.stop_strings` need `self.detokenize` (the tokenizer's decode); `on_token(row, id)` streams."""
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
