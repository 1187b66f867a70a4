"""Sample efficiency of PMP: fine-tune PMP-initialised and base-initialised tiny reward models on 50, 200 and
1,000 comparison pairs of the generated translation task, then measure held-out pairwise accuracy.

    python examples/rm_sample_efficiency.py [--out runs/rm-sample-efficiency] [--steps 300]

The PMP data (forum threads with votes) asks the same questions in other words, as in align.world.preferences.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from align.core.records import write_jsonl_atomic
from align.world.preferences import forum_threads, translation_comparisons


def align(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "align.cli", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def heldout_accuracy(run: Path, out: Path) -> dict:
    metrics = subprocess.run(
        [
            sys.executable,
            "-m",
            "align.cli",
            "rm",
            "eval",
            "--model",
            str(run / "final"),
            "--data",
            str(out / "heldout.jsonl"),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(metrics[metrics.index("{") :])["overall"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/rm-sample-efficiency"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    args = ap.parse_args()
    out = args.out
    write_jsonl_atomic(out / "pmp.jsonl", forum_threads(400, seed=7))
    write_jsonl_atomic(out / "pool.jsonl", translation_comparisons(max(args.sizes), seed=11))
    write_jsonl_atomic(out / "heldout.jsonl", translation_comparisons(400, seed=12))
    align("rm", "pmp", "configs/rm/pmp-tiny.yaml", f"data.train={out / 'pmp.jsonl'}", f"out_dir={out / 'pmp'}")
    results = [{"pairs": 0, "init": "pmp", **heldout_accuracy(out / "pmp", out)}]
    print(f"PMP model alone (no fine-tuning): held-out accuracy {results[0]['accuracy']:.3f}", flush=True)
    for n in args.sizes:
        for init in ("base", "pmp"):
            run = out / f"{init}-{n}"
            extra = [f"init={out / 'pmp' / 'final'}"] if init == "pmp" else []
            align(
                "rm",
                "train",
                "configs/rm/tiny.yaml",
                f"data.train={out / 'pool.jsonl'}",
                f"data.limit={n}",
                "data.eval_fraction=0",
                f"train.max_steps={args.steps}",
                f"out_dir={run}",
                *extra,
            )
            overall = heldout_accuracy(run, out)
            results.append({"pairs": n, "init": init, **overall})
            print(
                f"{init:>4} init, {n:>5} pairs: held-out accuracy {overall['accuracy']:.3f} "
                f"[{overall['ci95'][0]:.3f}, {overall['ci95'][1]:.3f}]",
                flush=True,
            )
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
