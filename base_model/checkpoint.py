"""Hugging Face checkpoint IO.

Reads Qwen v1 (`QWenLMHeadModel`) and Qwen2 (`Qwen2ForCausalLM`) folders, safetensors (sharded or not) or `.bin`;
writes Qwen2 format, which `transformers` and vLLM load as they are. Qwen v1 names map through one table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from base_model.atomic import atomic_folder
from base_model.config import QwenConfig
from base_model.model import QwenForCausalLM
from base_model.tokenizer import VOCAB_FILE, QwenTokenizer


class CheckpointError(ValueError):
    pass


# Qwen v1 name -> Qwen2 name(s). A tuple means the v1 tensor is q, k and v fused along the output dimension.
QWEN1_TO_QWEN2: list[tuple[str, str | tuple[str, ...]]] = [
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.ln_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("transformer.h.{i}.ln_1.weight", "model.layers.{i}.input_layernorm.weight"),
    ("transformer.h.{i}.ln_2.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("transformer.h.{i}.attn.c_attn.weight", tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv")),
    ("transformer.h.{i}.attn.c_attn.bias", tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv")),
    ("transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("transformer.h.{i}.mlp.w2.weight", "model.layers.{i}.mlp.gate_proj.weight"),  # w2 is the SwiGLU gate
    ("transformer.h.{i}.mlp.w1.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
]


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def qwen1_to_qwen2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for target, part, parts in _qwen1_targets(name):
            out[target] = tensor.chunk(parts, dim=0)[part].contiguous() if parts > 1 else tensor
    return out


def qwen2_to_qwen1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for src, dst in QWEN1_TO_QWEN2:
        names = dst if isinstance(dst, tuple) else (dst,)
        first = _template_regex(names[0])
        for name in state:
            m = first.match(name)
            if not m:
                continue
            fill = lambda t: t.replace("{i}", m.groupdict().get("i") or "")
            out[fill(src)] = torch.cat([state[fill(n)] for n in names], dim=0)
    return out


# ---------------------------------------------------------------------------------------------------- configs


def config_from_hf(d: dict, source: str = "config.json") -> tuple[QwenConfig, str]:
    """A `config.json` dict → (QwenConfig, "qwen" | "qwen2"). Unknown architectures fail naming the file."""
    arch = (d.get("architectures") or [None])[0]
    model_type = d.get("model_type")
    try:
        if model_type == "qwen" or arch == "QWenLMHeadModel":
            return _config_from_qwen1(d), "qwen"
        if model_type == "qwen2" or arch == "Qwen2ForCausalLM":
            return _config_from_qwen2(d, source), "qwen2"
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
    raise CheckpointError(
        f"{source}: unknown architecture {arch!r} (model_type {model_type!r}); "
        "expected QWenLMHeadModel (Qwen v1) or Qwen2ForCausalLM"
    )


def _config_from_qwen1(d: dict) -> QwenConfig:
    if not d.get("scale_attn_weights", True):
        raise CheckpointError("config.json: scale_attn_weights=false is not supported")
    return QwenConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"] // 2,  # v1 stores twice the SwiGLU width
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        head_dim=d.get("kv_channels", d["hidden_size"] // d["num_attention_heads"]),
        rotary_pct=d.get("rotary_pct", 1.0),
        rope_theta=d.get("rotary_emb_base", 10000.0),
        rms_norm_eps=d.get("layer_norm_epsilon", 1e-6),
        seq_length=d.get("seq_length", 2048),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        use_dynamic_ntk=d.get("use_dynamic_ntk", False),
        use_logn_attn=d.get("use_logn_attn", False),
        attention_dropout=d.get("attn_dropout_prob", 0.0),
        hidden_dropout=d.get("emb_dropout_prob", 0.0),
        initializer_range=d.get("initializer_range", 0.02),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
    )


def _config_from_qwen2(d: dict, source: str) -> QwenConfig:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (only the default RoPE)")
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    layers = d["num_hidden_layers"]
    windows = d.get("window_sizes")
    if windows is None and d.get("layer_types") and "sliding_attention" in d["layer_types"]:
        windows = [d["sliding_window"] if t == "sliding_attention" else None for t in d["layer_types"]]
    elif windows is None and d.get("use_sliding_window") and d.get("sliding_window"):
        first = d.get("max_window_layers", layers)
        windows = [d["sliding_window"] if i >= first else None for i in range(layers)]
    return QwenConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"),
        rotary_pct=d.get("partial_rotary_factor", d.get("rotary_pct", 1.0)),
        rope_theta=theta,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        seq_length=d.get("seq_length", d.get("max_position_embeddings", 32768)),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        use_dynamic_ntk=d.get("use_dynamic_ntk", False),
        use_logn_attn=d.get("use_logn_attn", False),
        ntk_alpha=d.get("ntk_alpha", 1.0),
        window_sizes=windows,
        attention_dropout=d.get("attention_dropout", 0.0),
        hidden_dropout=d.get("hidden_dropout", 0.0),
        initializer_range=d.get("initializer_range", 0.02),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
    )


def config_to_hf(config: QwenConfig, dtype: torch.dtype, tokenizer: QwenTokenizer | None = None) -> dict:
    """Qwen2 `config.json`. Writes both `rope_theta` (older readers, vLLM) and `rope_parameters` (transformers 5)."""
    d = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # Qwen v1 behaviour that Qwen2 readers ignore; this workbench reads it back.
        "seq_length": config.seq_length,
        "use_dynamic_ntk": config.use_dynamic_ntk,
        "use_logn_attn": config.use_logn_attn,
        "ntk_alpha": config.ntk_alpha,
        "hidden_dropout": config.hidden_dropout,
    }
    if config.rotary_pct < 1.0:
        d["partial_rotary_factor"] = config.rotary_pct
    if config.window_sizes is not None:
        d["window_sizes"] = config.window_sizes
        sizes = {w for w in config.window_sizes if w is not None}
        if len(sizes) == 1:  # expressible in Qwen2's own terms
            d["use_sliding_window"] = True
            d["sliding_window"] = sizes.pop()
            d["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in config.window_sizes]
    if tokenizer is not None:
        d["bos_token_id"] = tokenizer.eod_id
        d["eos_token_id"] = tokenizer.im_end_id
        d["pad_token_id"] = tokenizer.eod_id
    return d


# ------------------------------------------------------------------------------------------------------ read


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class CheckpointTensors:
    """The tensors of a checkpoint folder under their Qwen2 names, each read on demand straight onto a device
    (safetensors; a .bin file is memory-mapped on the CPU). Qwen v1's fused q/k/v tensor gives each of its parts.
    Building a sharded model reads one tensor at a time, so no device ever holds the whole checkpoint."""

    def __init__(self, folder: Path, arch: str = "qwen2") -> None:
        self.folder, self.arch = folder, arch
        self._stored: dict[str, Path] = {}  # stored name -> file
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._find_files()
        # Qwen2 name -> (stored name, part, parts)
        self._parts: dict[str, tuple[str, int, int]] = {}
        for stored in self._stored:
            if arch != "qwen":
                self._parts[stored] = (stored, 0, 1)
                continue
            for name, part, parts in _qwen1_targets(stored):
                self._parts[name] = (stored, part, parts)

    def _find_files(self) -> None:
        folder = self.folder
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = folder / index_name
            if not index_path.exists():
                continue
            weight_map: dict[str, str] = _read_json(index_path).get("weight_map") or {}
            if not weight_map:
                raise CheckpointError(f"{index_path}: empty or missing weight_map")
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).exists():
                    example = next(k for k, v in weight_map.items() if v == shard)
                    raise CheckpointError(
                        f"{folder / shard}: shard listed in {index_name} is missing (it holds {example!r})"
                    )
                held = self._keys(folder / shard)
                for name in [k for k, v in weight_map.items() if v == shard]:
                    if name not in held:
                        raise CheckpointError(f"{index_path}: tensor {name!r} is not in {shard}")
                self._stored.update({k: folder / shard for k in held})
            return
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).exists():
                self._stored = {k: folder / name for k in self._keys(folder / name)}
                return
        raise CheckpointError(f"{folder}: no model.safetensors, pytorch_model.bin or index file found")

    def _keys(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    return list(f.keys())
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        return list(self._bin(path))

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bins:
            try:
                try:
                    self._bins[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
                    self._bins[path] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read PyTorch weights ({e})") from None
        return self._bins[path]

    def names(self) -> list[str]:
        return list(self._parts)

    def file(self, name: str) -> Path:
        return self._stored[self._parts[name][0]]

    def shape(self, name: str) -> tuple[int, ...]:
        stored, _, parts = self._parts[name]
        path = self._stored[stored]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shape = list(f.get_slice(stored).get_shape())
        else:
            shape = list(self._bin(path)[stored].shape)
        shape[0] //= parts
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        stored = self._parts[name][0]
        path = self._stored[stored]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                stored_dtype = f.get_slice(stored).get_dtype()
            if stored_dtype not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {stored!r} is stored as {stored_dtype}, not a float type")
            return _SAFETENSORS_DTYPES[stored_dtype]
        return self._bin(path)[stored].dtype

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, part, parts = self._parts[name]
        path = self._stored[stored]
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    tensor = f.get_tensor(stored)
            else:
                tensor = self._bin(path)[stored].to(device)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {stored!r} ({e})") from None
        if parts > 1:
            tensor = tensor.chunk(parts, dim=0)[part].contiguous()
        return tensor.to(dtype) if dtype is not None else tensor


def _qwen1_targets(name: str) -> list[tuple[str, int, int]]:
    """The Qwen2 names a Qwen v1 tensor holds, with each one's part of its first dimension."""
    for src, dst in QWEN1_TO_QWEN2:
        m = _template_regex(src).match(name)
        if not m:
            continue
        names = dst if isinstance(dst, tuple) else (dst,)
        return [(n.replace("{i}", m.groupdict().get("i") or ""), k, len(names)) for k, n in enumerate(names)]
    raise CheckpointError(f"unknown Qwen v1 tensor {name!r}")


def open_checkpoint(path: str | Path) -> tuple[QwenConfig, CheckpointTensors]:
    """A checkpoint folder's config and its tensors, checked against the model the config describes (every tensor
    present with its shape, none unexpected) without reading any tensor's data."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config, arch = config_from_hf(_read_json(folder / "config.json"), str(folder / "config.json"))
    tensors = CheckpointTensors(folder, arch)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    tied = config.tie_word_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    present = set(tensors.names()) - ({"lm_head.weight"} if tied else set())
    for name, param in expected.items():
        if name not in present:
            raise CheckpointError(f"{_tensor_file(folder, name, arch)}: tensor {name!r} is missing")
        if tensors.shape(name) != tuple(param.shape):
            raise CheckpointError(
                f"{tensors.file(name)}: tensor {name!r} has shape {tensors.shape(name)}, "
                f"expected {tuple(param.shape)} from config.json"
            )
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise CheckpointError(f"{tensors.file(unexpected[0])}: unexpected tensor {unexpected[0]!r}")
    return config, tensors


def _tensor_file(folder: Path, name: str, arch: str) -> str:
    """Which file holds a tensor (for error messages)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).exists():
            weight_map = _read_json(folder / index_name).get("weight_map", {})
            if arch == "qwen":
                for src, dst in QWEN1_TO_QWEN2:
                    names = dst if isinstance(dst, tuple) else (dst,)
                    for n in names:
                        m = _template_regex(n).match(name)
                        if m:
                            name = src.replace("{i}", m.groupdict().get("i") or "")
            return str(folder / weight_map.get(name, index_name))
    for f in ("model.safetensors", "pytorch_model.bin"):
        if (folder / f).exists():
            return str(folder / f)
    return str(folder)


def load_config(path: str | Path) -> QwenConfig:
    folder = Path(path)
    return config_from_hf(_read_json(folder / "config.json"), str(folder / "config.json"))[0]


def load_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> QwenForCausalLM:
    """Build a `QwenForCausalLM` from a Qwen v1 or Qwen2 checkpoint folder: on the meta device, then with the
    checkpoint's tensors read straight onto `device` and assigned (nothing initialised, nothing built on the CPU).
    Without `dtype`, the first tensor's dtype."""
    config, tensors = open_checkpoint(path)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    names = [k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")]
    target = dtype or tensors.dtype(names[0])
    state = {k: tensors.get(k, device, target) for k in names}
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


# ----------------------------------------------------------------------------------------------------- write


def save_pretrained(
    model: QwenForCausalLM,
    path: str | Path,
    tokenizer: QwenTokenizer | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Write a Qwen2-format folder (config.json, safetensors shards with an index when sharded, tokenizer files).

    The folder is written beside the target and renamed into place, so a crash never leaves a half-written
    checkpoint where a good one was.
    """
    with atomic_folder(path) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        _write_shards(state, tmp, max_shard_bytes)
        config = config_to_hf(model.config, model.dtype, tokenizer)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(tokenizer), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)


def _generation_config(tokenizer: QwenTokenizer | None) -> dict:
    d: dict = {"do_sample": True, "top_p": 0.8, "max_new_tokens": 512}
    if tokenizer is not None:
        d.update(eos_token_id=[tokenizer.im_end_id, tokenizer.eod_id], pad_token_id=tokenizer.eod_id)
    return d


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert(src: str | Path, dst: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Convert any readable checkpoint (Qwen v1 or Qwen2) into a Qwen2-format folder, tokenizer included."""
    src = Path(src)
    model = load_pretrained(src)
    tokenizer = QwenTokenizer.from_file(src / VOCAB_FILE) if (src / VOCAB_FILE).exists() else None
    save_pretrained(model, dst, tokenizer, max_shard_bytes)
