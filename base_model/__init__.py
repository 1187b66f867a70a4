"""The Qwen base model: architecture, tokenizer, checkpoint IO and generation. Imports nothing else of ours."""

from base_model.checkpoint import (
    CheckpointError,
    CheckpointTensors,
    convert,
    load_pretrained,
    open_checkpoint,
    save_pretrained,
)
from base_model.config import QwenConfig
from base_model.model import KVCache, QwenForCausalLM
from base_model.tokenizer import QwenTokenizer

__all__ = [
    "CheckpointError",
    "CheckpointTensors",
    "KVCache",
    "QwenConfig",
    "QwenForCausalLM",
    "QwenTokenizer",
    "convert",
    "load_pretrained",
    "open_checkpoint",
    "save_pretrained",
]
