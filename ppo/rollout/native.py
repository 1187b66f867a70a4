"""The native rollout engine: our own batched KV-cache sampler on a private copy of the policy (CPU or GPU)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from base_model import QwenConfig, QwenForCausalLM
from base_model.generate import SamplingParams, generate
from ppo.rollout.engine import Rollout


class NativeEngine:
    def __init__(self, config: QwenConfig, pad_id: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = QwenForCausalLM(config).to(device=device, dtype=dtype).eval()
        self.pad_id = pad_id
        self._params = dict(self.model.named_parameters())

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        out = generate(self.model, prompt_ids, sampling, pad_id=self.pad_id)
        return [Rollout(t, lp, r) for t, lp, r in zip(out.token_ids, out.logprobs, out.finish_reasons)]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen = set()
        for name, tensor in named_tensors:
            if name not in self._params:
                raise KeyError(f"native engine: no parameter named {name!r}")
            self._params[name].copy_(tensor)
            seen.add(name)
        missing = set(self._params) - seen
        if missing and not (self.model.config.tie_word_embeddings and missing == {"lm_head.weight"}):
            raise KeyError(f"native engine: weights not updated for {sorted(missing)[:3]}")
