"""Building models from a `ModelSource`, and saving them from a training engine."""

from __future__ import annotations

from pathlib import Path

import torch

from align.core import distributed
from align.core.config import ConfigError, load_config
from align.core.engine import build_partitioned
from align.core.sections import DeepSpeedSection, ModelSource
from base_model import QwenConfig, QwenForCausalLM, QwenTokenizer, load_pretrained, open_checkpoint, save_pretrained


def load_tokenizer(source: ModelSource) -> QwenTokenizer:
    if source.tokenizer is not None:
        return QwenTokenizer.load(source.tokenizer)
    if source.init is None:
        raise ConfigError("model.tokenizer is required when the model is initialised from model.config")
    return QwenTokenizer.from_file(Path(source.init))


def load_partitioned(path: str | Path, ds: DeepSpeedSection) -> QwenForCausalLM:
    """A checkpoint built straight into ZeRO-3 partitions, one tensor read at a time onto the training device."""
    config, tensors = open_checkpoint(path)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    return build_partitioned(model, lambda name, t: t.copy_(tensors.get(name, t.device)), ds)


def load_trained(path: str | Path, ds: DeepSpeedSection, device: torch.device | str) -> QwenForCausalLM:
    """A checkpoint to train under `ds`: straight into partitions under ZeRO-3, else whole in fp32 on `device`."""
    if ds.zero_stage == 3:
        return load_partitioned(path, ds)
    return load_pretrained(path, dtype=torch.float32, device=device)


def build_model(
    source: ModelSource, seed: int = 0, device: torch.device | str = "cpu", deepspeed: DeepSpeedSection | None = None
) -> tuple[QwenForCausalLM, QwenTokenizer]:
    """The model and tokenizer named by `source`: a checkpoint read straight onto `device`, or a fresh model from a
    config built on the meta device and initialised once, on `device`, from `seed` (fp32). Under a ZeRO-3
    `deepspeed` section the model is built straight into partitions (`build_partitioned`) with the same values."""
    tokenizer = load_tokenizer(source)
    partitioned = deepspeed is not None and deepspeed.zero_stage == 3
    if source.init is not None:
        model = load_trained(source.init, deepspeed or DeepSpeedSection(), device)
    elif source.config is not None:
        config = load_config(QwenConfig, source.config)
        if source.fit_vocab:
            config.vocab_size = -(-len(tokenizer) // 128) * 128
        torch.manual_seed(seed)  # the run's other draws (dropout) start from the seed too
        if partitioned:
            with torch.device("meta"):
                model = QwenForCausalLM(config)
            generator = torch.Generator(distributed.device()).manual_seed(seed)
            build_partitioned(model, lambda name, t: model.init_parameter(name, t, generator), deepspeed)
        else:
            model = QwenForCausalLM(config, device=device, seed=seed)
    else:
        raise ConfigError("model: give either init (a checkpoint folder) or config (a model config YAML)")
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"model: the tokenizer has {len(tokenizer)} ids but the model's vocab_size is "
            f"{model.config.vocab_size}; set model.fit_vocab=true for a fresh model"
        )
    if source.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = source.dropout
            if hasattr(module, "dropout") and isinstance(module.dropout, float):
                module.dropout = source.dropout
        model.config.attention_dropout = model.config.hidden_dropout = source.dropout
    model.config.gradient_checkpointing = source.gradient_checkpointing
    if source.compile:
        model.compile_layers()
    return model.train(), tokenizer


def save_from_engine(engine, config: QwenConfig, tokenizer: QwenTokenizer, path: Path, is_rank0: bool) -> None:
    """Gather the (possibly ZeRO-3 sharded) weights and write a Hugging Face folder from rank 0."""
    state = engine.full_state_dict()  # every rank takes part in the gather
    if not is_rank0:
        return
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=not config.tie_word_embeddings)
    save_pretrained(model, path, tokenizer)
