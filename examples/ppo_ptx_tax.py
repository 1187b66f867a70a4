"""The alignment tax and the ptx term: run the tiny PPO recipe with ptx_coef = 0 and > 0 from a policy that was
pretrained on the packed corpus and then fine-tuned, and compare the policy's loss on held-out pretraining rows
(and the reward it reaches on held-out prompts).

    python examples/ppo_ptx_tax.py [--out runs/ppo-ptx] [--iterations 40] [--coefs 0 0.5 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from align.core.metrics import read_metrics
from align.core.records import write_jsonl_atomic
from align.world import ppo_task
from align.world.corpus import documents


def align(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "align.cli", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/ppo-ptx"))
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--coefs", type=float, nargs="+", default=[0.0, 0.5, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    out = args.out
    write_jsonl_atomic(out / "corpus.jsonl", documents(1500, seed=0))
    write_jsonl_atomic(out / "sft.jsonl", ppo_task.sft_conversations(300, 0))
    write_jsonl_atomic(out / "rm.jsonl", ppo_task.enthusiasm_comparisons(600, 0))
    align(
        "data",
        "pack",
        "--input",
        str(out / "corpus.jsonl"),
        "--output",
        str(out / "packed"),
        "--tokenizer",
        "bytes",
        "--seq-len",
        "128",
    )
    align(
        "pretrain",
        "configs/pretrain/tiny.yaml",
        f"data.train={out / 'packed'}",
        "train.max_steps=300",
        "train.save_every=0",
        f"out_dir={out / 'base'}",
    )
    align(
        "sft",
        "configs/sft/tiny.yaml",
        f"model.init={out / 'base' / 'final'}",
        "model.config=null",
        "model.tokenizer=null",
        f"data.train={out / 'sft.jsonl'}",
        "train.max_steps=300",
        "train.save_every=0",
        f"out_dir={out / 'sft'}",
    )
    align(
        "rm",
        "train",
        "configs/rm/tiny.yaml",
        f"data.train={out / 'rm.jsonl'}",
        "train.epochs=3",
        f"out_dir={out / 'rm'}",
    )
    results = []
    for coef in args.coefs:
        for seed in args.seeds:
            run = out / f"ptx-{coef}-seed{seed}"
            align(
                "ppo",
                "configs/ppo/tiny.yaml",
                f"models.policy={out / 'sft' / 'final'}",
                f"models.reward={out / 'rm' / 'final'}",
                f"data.ptx={out / 'packed'}",
                "data.ptx_eval_rows=32",
                f"ppo.ptx_coef={coef}",
                f"ppo.iterations={args.iterations}",
                f"train.seed={seed}",
                "train.save_every=0",
                f"out_dir={run}",
            )
            evals = [r for r in read_metrics(run) if "eval/ptx_loss" in r]
            first, last = evals[0], evals[-1]
            row = {
                "ptx_coef": coef,
                "seed": seed,
                "ptx_loss_before": first["eval/ptx_loss"],
                "ptx_loss_after": last["eval/ptx_loss"],
                "ptx_loss_rise": last["eval/ptx_loss"] - first["eval/ptx_loss"],
                "reward_before": first["eval/reward_mean"],
                "reward_after": last["eval/reward_mean"],
                "kl_after": last["eval/kl"],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
