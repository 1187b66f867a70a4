"""`align demo | sweep | report | bench`: argument parsing only; each handler calls one library function and prints its result."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> None:
    from align.demo import run_demo

    out = run_demo(args.out, quick=args.quick, seed=args.seed)
    g = out["summary"]["gold"]
    d = g["ppo_minus_sft"]
    print(
        f"gold score on held-out prompts: base {g['base']['mean']:.3f}, SFT {g['sft']['mean']:.3f}, "
        f"PPO {g['ppo']['mean']:.3f}; PPO - SFT {d['mean']:+.3f} (95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})"
    )
    print(f"report: {out['report']}\nfigures: {args.out / 'summary.json'}")
    print((args.out / "labelling.txt").read_text(encoding="utf-8"), end="")


def cmd_sweep(args: argparse.Namespace) -> None:
    from align.sweep import run_sweep

    run_sweep(args.config, args.overrides)


def cmd_report(args: argparse.Namespace) -> None:
    from align.report import write_report

    print(f"wrote {write_report(args.dir)}")


def cmd_bench(args: argparse.Namespace) -> None:
    from align.bench import run

    run(args.suites, args.device, args.json)


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the demo world: tokenizer → pretrain → SFT → PMP → "
        "labelling → RM → PPO → gold evaluation → report",
    )
    p.add_argument("--out", type=Path, default=Path("align-demo"), help="output folder (re-runs reuse its stages)")
    p.add_argument("--quick", action="store_true", help="the small variant (a few minutes; what the tests run)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "sweep",
        help="grid, random or Bayesian (Optuna) search over any stage's config keys: parallel, one trial per GPU, "
        "resumable after a kill, ranked report",
    )
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file (e.g. out_dir=runs/s2)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "report",
        help="the HTML report of a demo, sweep or run folder (proxy against gold, KL frontiers), from its files",
    )
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="performance side by side with the usual peers (peak, model, generate, ppo, tags)")
    p.add_argument("suites", nargs="*", help="suites to run (default: all but taxonomy, which takes minutes)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_bench)
