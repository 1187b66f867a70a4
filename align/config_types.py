"""Which config type each folder under `configs/` holds (used by commands and by the test that loads them all)."""

from __future__ import annotations

from pathlib import Path

from align.sweep import SweepConfig
from base_model import QwenConfig
from base_model.pretrain.train import PretrainConfig
from ppo.train import PPOConfig
from rm.tags.taxonomy import TaxonomyFile
from rm.train import RMConfig
from sft.dpo import DPOConfig
from sft.train import SFTConfig

CONFIG_TYPES: dict[str, type] = {
    "model": QwenConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "rm": RMConfig,
    "pretrain": PretrainConfig,
    "ppo": PPOConfig,
    "taxonomy": TaxonomyFile,
    "sweeps": SweepConfig,
}


def config_type_for(path: str | Path) -> type:
    folder = Path(path).parent.name
    if folder not in CONFIG_TYPES:
        raise KeyError(f"{path}: no config type is registered for configs/{folder}/")
    return CONFIG_TYPES[folder]
