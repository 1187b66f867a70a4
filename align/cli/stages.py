"""`align sft | dpo | rm | ppo | pretrain`: argument parsing only; each handler calls one library function and prints its result."""

from __future__ import annotations

import argparse
from pathlib import Path

from align.cli.numbers import count
from align.core.config import ConfigError


def cmd_sft(args: argparse.Namespace) -> None:
    if args.config == "preview":  # `align sft preview --data FILE`: the tokens a config would train on
        return cmd_sft_preview(args)
    from align.core.config import load_config
    from sft.train import SFTConfig, main

    main(load_config(SFTConfig, args.config, args.overrides))


def cmd_dpo(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from sft.dpo import DPOConfig, main

    main(load_config(DPOConfig, args.config, args.overrides))


def cmd_sft_preview(args: argparse.Namespace) -> None:
    from base_model import QwenTokenizer
    from sft.preview import preview

    if args.data is None:
        raise ConfigError("align sft preview needs --data FILE")
    tokenizer = QwenTokenizer.load(args.tokenizer)
    preview(str(args.data), tokenizer, args.max_len, args.mask_mode, args.limit, color=False if args.plain else None)


def cmd_rm(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from rm.train import RMConfig, main

    overrides = list(args.overrides) + ([f"stage={'pmp' if args.rm_command == 'pmp' else 'finetune'}"])
    main(load_config(RMConfig, args.config, overrides))


def cmd_rm_eval(args: argparse.Namespace) -> None:
    from rm.eval import dump_metrics, evaluate_file

    report = args.report or (args.model / "eval_report.html")
    metrics = evaluate_file(str(args.model), str(args.data), args.max_len, args.batch_size, report, args.on_error)
    if args.json:
        print(dump_metrics(metrics))
    else:
        o = metrics["overall"]
        print(
            f"pairwise accuracy {o['accuracy']:.4f} over {o['n']} pairs, 95% CI [{o['ci95'][0]:.4f}, "
            f"{o['ci95'][1]:.4f}]; length-only baseline {metrics['length_baseline']['accuracy']:.4f}"
        )
        if metrics["left_out"]:
            left_out = ", ".join(f"{n} {reason}" for reason, n in metrics["left_out"].items())
            print(f"left out {left_out}; first: " + "; ".join(metrics["left_out_examples"]))
        for source, v in metrics["per_source"].items():
            print(f"  {source}: {v['accuracy']:.4f} ({v['n']} pairs)")
        print(f"report: {report}")


def cmd_rm_score(args: argparse.Namespace) -> None:
    from rm.eval import score_file

    n = score_file(str(args.model), str(args.data), str(args.out), args.max_len, args.batch_size, args.normalise)
    print(f"scored {n} records into {args.out}")


def cmd_ppo(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from ppo.train import PPOConfig, main

    main(load_config(PPOConfig, args.config, args.overrides))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from base_model.pretrain.train import PretrainConfig, main

    main(load_config(PretrainConfig, args.config, args.overrides))


def register(sub) -> None:
    p = sub.add_parser("sft", help="ChatML supervised fine-tuning (`align sft preview` shows the trained tokens)")
    p.add_argument("config", help="SFT config YAML, e.g. configs/sft/tiny.yaml; or `preview` (options below)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    p.set_defaults(func=cmd_sft)
    q = p.add_argument_group("align sft preview: the tokens that would be trained on, marked")
    q.add_argument("--data", type=Path, default=None)
    q.add_argument("--tokenizer", default="cl100k_base", help="'cl100k_base', 'bytes', a ranks file or a checkpoint")
    q.add_argument("--mask-mode", choices=["assistant", "qwen", "none"], default="assistant")
    q.add_argument("--max-len", type=count(1), default=4096)
    q.add_argument("--limit", type=count(1), default=3, help="conversations to show")
    q.add_argument("--plain", action="store_true", help="mark trained text with ⟦ ⟧ instead of colour")

    p = sub.add_parser("dpo", help="offline preference optimisation: dpo | cdpo | ipo | simpo | kto (objective.loss)")
    p.add_argument("config", help="DPO config YAML, e.g. configs/dpo/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. objective.loss=ipo")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("rm", help="reward model: pmp | train | eval | score")
    rm_sub = p.add_subparsers(dest="rm_command", metavar="pmp|train|eval|score")
    rm_sub.required = True
    for name, text in (
        ("pmp", "preference model pretraining on forum threads or comparison pairs"),
        ("train", "fine-tune on human comparisons (init=PMP_CHECKPOINT)"),
    ):
        q = rm_sub.add_parser(name, help=text)
        q.add_argument("config", type=Path)
        q.add_argument("overrides", nargs="*")
        q.set_defaults(func=cmd_rm)
    q = rm_sub.add_parser("eval", help="pairwise accuracy, per tag and source, calibration; an HTML report")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--json", action="store_true", help="print every figure as JSON")
    q.add_argument("--report", type=Path, default=None, help="HTML report path (default: MODEL/eval_report.html)")
    q.add_argument("--max-len", type=count(1), default=2048)
    q.add_argument("--batch-size", type=count(1), default=16)
    q.add_argument(
        "--on-error", choices=["skip", "raise"], default="skip", help="records that give no pair: count or stop"
    )
    q.set_defaults(func=cmd_rm_eval)
    q = rm_sub.add_parser("score", help="score conversations in batches")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--normalise", action="store_true", help="standardise with the saved training statistics")
    q.add_argument("--max-len", type=count(1), default=2048)
    q.add_argument("--batch-size", type=count(1), default=16)
    q.set_defaults(func=cmd_rm_score)

    p = sub.add_parser("ppo", help="PPO with a reward model, a value model, a reference policy and ptx")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("pretrain", help="pretraining / continued pretraining on packed data")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_pretrain)
