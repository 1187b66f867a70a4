"""`align init-model | generate | chat | convert`: argument parsing only; each handler calls one library function and prints its result."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.cli.numbers import amount, count
from align.core.config import ConfigError


def cmd_init_model(args: argparse.Namespace) -> None:
    """Write a randomly initialised model (and tokenizer) as a checkpoint folder."""
    from align.core.config import load_config
    from base_model import QwenConfig, QwenForCausalLM, QwenTokenizer, save_pretrained

    config = load_config(QwenConfig, args.config, args.overrides)
    tokenizer = QwenTokenizer.load(args.tokenizer)
    if args.fit_vocab:
        config.vocab_size = -(-len(tokenizer) // 128) * 128
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"{args.config}: vocab_size {config.vocab_size} is smaller than the tokenizer "
            f"({len(tokenizer)} ids); pass --fit-vocab"
        )
    model = QwenForCausalLM(config, seed=args.seed)
    save_pretrained(model, args.out, tokenizer)
    print(f"wrote {config.num_parameters():,}-parameter model to {args.out}")


def _sampling(args: argparse.Namespace, tokenizer):
    from base_model.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop_token_ids=(tokenizer.im_end_id, tokenizer.eod_id),
        seed=args.seed,
        vocab_limit=len(tokenizer),
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from align.core.chatml import render
    from align.core.distributed import device
    from base_model import QwenTokenizer, load_pretrained
    from base_model.generate import generate

    model = load_pretrained(args.model, device=device())
    tokenizer = QwenTokenizer.from_file(args.model)
    prompts = args.prompt
    if args.raw:
        ids = [tokenizer.encode(p) for p in prompts]
    else:
        messages = lambda p: (
            ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}]
        )
        ids = [render(messages(p), tokenizer, add_generation_prompt=True) for p in prompts]
    out = generate(model, ids, _sampling(args, tokenizer), pad_id=tokenizer.pad_id)
    for prompt, tokens in zip(prompts, out.token_ids):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)


def cmd_chat(args: argparse.Namespace) -> None:
    from align.core.chatml import render
    from align.core.distributed import device
    from align.serve import Streamer
    from base_model import QwenTokenizer, load_pretrained
    from base_model.generate import generate

    model = load_pretrained(args.model, device=device())
    tokenizer = QwenTokenizer.from_file(args.model)
    special = set(tokenizer.special_tokens.values())
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("ChatML session. /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        ids = render(system + history, tokenizer, add_generation_prompt=True, max_window_size=args.max_window_size)
        streamer = Streamer(tokenizer, ())
        print("assistant> ", end="", flush=True)

        def show(_row: int, token: int) -> None:  # the reply as it is written (special tokens are not text)
            if token not in special:
                print(streamer.push(token), end="", flush=True)

        out = generate(model, [ids], _sampling(args, tokenizer), pad_id=tokenizer.pad_id, on_token=show)
        print(streamer.finish(tokenizer.decode(streamer.ids)), flush=True)
        reply = tokenizer.decode(out.token_ids[0], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})


def cmd_convert(args: argparse.Namespace) -> None:
    from base_model import convert

    convert(args.src, args.dst, max_shard_bytes=int(args.max_shard_mb * 1024**2))
    print(f"wrote Qwen2-format checkpoint to {args.dst}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=count(1), default=64)
    p.add_argument("--temperature", type=amount(minimum=0), default=0.7, help="0 for greedy decoding")
    p.add_argument("--top-p", type=amount(above=0, maximum=1), default=0.8)
    p.add_argument("--top-k", type=count(0), default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt (default: Qwen's 'You are a helpful assistant.')")


def register(sub) -> None:
    p = sub.add_parser("init-model", help="write a randomly initialised model from a model config")
    p.add_argument("config", type=Path, help="model config YAML, e.g. configs/model/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--tokenizer", default="cl100k_base", help="'cl100k_base', 'bytes' or a qwen.tiktoken ranks file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--fit-vocab", action="store_true", help="set vocab_size to the tokenizer's size (rounded up to 128)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("generate", help="sample from a checkpoint")
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (Qwen v1 or Qwen2 format)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--raw", action="store_true", help="use the prompt as plain text instead of a ChatML user turn")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive ChatML session with a checkpoint")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument(
        "--max-window-size", type=count(1), default=6144, help="drop the oldest turns beyond this many tokens"
    )
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=256)

    p = sub.add_parser("convert", help="convert a Qwen v1 or Qwen2 checkpoint to Hugging Face Qwen2 format")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--max-shard-mb", type=amount(above=0), default=2048)
    p.set_defaults(func=cmd_convert)
