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


# Qwen's ReAct prompt (its `examples/react_prompt.md`): tool descriptions for a conversation with tools.
TOOL_DESC = (
    "{name}: Call this tool to interact with the {name} API. What is the {name} API useful for? {description} "
    "Parameters: {parameters} Format the arguments as a JSON object."
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following tools:

{tool_descs}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""


def _jinja(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _chat_template() -> str:
    """ChatML with Qwen's default system prompt and ReAct tools, the text `align.core.chatml.render_text` writes.

    Written without whitespace control and with newlines as `nl` (transformers renders with trim_blocks)."""
    head, rest = REACT_INSTRUCTION.split("{tool_descs}")
    middle, tail = rest.split("{tool_names}")
    desc = TOOL_DESC.replace("{name}", "' ~ f['name'] ~ '").replace("{description}", "' ~ desc ~ '")
    desc = "'" + desc.replace("{parameters}", "' ~ (params | tojson) ~ '") + "'"
    tool = "m['role'] in ['tool', 'function']"
    return (
        "{% set nl = '\\n' %}"
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set rest = messages[1:] %}{% else %}{% set system = 'You are a helpful assistant.' %}"
        "{% set rest = messages %}{% endif %}"
        "{% if tools %}{% set ns = namespace(descs=[], names=[]) %}{% for t in tools %}"
        "{% set f = t['function'] if t['function'] is defined else t %}"
        "{% set params = f['parameters'] if f['parameters'] is defined else {} %}"
        "{% set desc = f['description'] if f['description'] is defined else '' %}"
        f"{{% set ns.descs = ns.descs + [{desc}] %}}{{% set ns.names = ns.names + [f['name']] %}}{{% endfor %}}"
        f"{{% set system = system ~ nl ~ nl ~ {_jinja(head)} ~ (ns.descs | join(nl ~ nl)) ~ {_jinja(middle)}"
        f" ~ (ns.names | join(', ')) ~ {_jinja(tail)} %}}{{% endif %}}"
        "<|im_start|>system{{ nl }}{{ system }}<|im_end|>{{ nl }}"
        "{% for m in rest %}"
        f"{{% if {tool} %}}{{{{ nl }}}}Observation: {{{{ m['content'] }}}}{{% else %}}"
        "{% if m['role'] == 'assistant' and loop.previtem is defined"
        " and loop.previtem['role'] in ['tool', 'function'] %}{{ nl }}"
        "{% else %}<|im_start|>{{ m['role'] }}{{ nl }}{% endif %}"
        "{% if m['content'] %}{{ m['content'] }}{% endif %}"
        "{% if m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] %}"
        "{% for c in m['tool_calls'] %}{% set f = c['function'] if c['function'] is defined else c %}"
        "{% set args = f['arguments'] if f['arguments'] is defined else {} %}"
        "{% if m['content'] or not loop.first %}{{ nl }}{% endif %}"
        "Action: {{ f['name'] }}{{ nl }}Action Input: "
        "{% if args is string %}{{ args }}{% else %}{{ args | tojson }}{% endif %}{% endfor %}{% endif %}"
        "{% endif %}"
        "{% if loop.nextitem is not defined or (loop.nextitem['role'] not in ['tool', 'function']"
        f" and not ({tool} and loop.nextitem['role'] == 'assistant')) %}}<|im_end|>{{{{ nl }}}}{{% endif %}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{{ nl }}{% endif %}"
    )


CHAT_TEMPLATE = _chat_template()


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
        "chat_template": CHAT_TEMPLATE,
    }
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
