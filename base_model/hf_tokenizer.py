"""A Hugging Face `tokenizer.json` equivalent to a `QwenTokenizer`, so `AutoTokenizer` and vLLM load our folders.

tiktoken ranks are byte-level BPE: every multi-byte token was made by merging two lower-ranked tokens, so the merge
list is recovered from every split of each token whose halves are both in the vocabulary, ordered by the rank of
the merged token (tiktoken merges the adjacent pair whose result has the lowest rank). Built with the `tokenizers` library (installed with `transformers`).
"""

from __future__ import annotations

import functools
import json


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _to_str(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def tokenizer_json(ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str) -> str:
    """The serialised `tokenizers.Tokenizer` for these ranks and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {_to_str(t): r for t, r in ranks.items()}
    model = BPE(vocab=vocab, merges=[(_to_str(a), _to_str(b)) for *_, a, b in merges], fuse_unk=False)
    tok = Tokenizer(model)
    if hasattr(tok.model, "ignore_merges"):
        tok.model.ignore_merges = True  # a whole pre-token that is itself in the vocabulary is one token, as tiktoken
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, _ in sorted(special_tokens.items(), key=lambda x: x[1])]
    )
    return tok.to_str()


def tokenizer_config(special_tokens: dict[str, int], eos: str, pad: str, max_length: int) -> str:
    decoder = {
        str(i): {
            "content": t,
            "special": True,
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
            "single_word": False,
        }
        for t, i in special_tokens.items()
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": (
            "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    }
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
