"""`align demo`: the whole Qwen alignment pipeline on the demo world, on a laptop CPU.

world → tokenizer (BPE learned from bytes on the demo corpus) → pretraining → SFT → reward-model PMP → labelling
(simulated annotators, through the labelling app's import, REST API and export) → reward-model fine-tuning on a
tag-balanced sample → PPO with ptx → gold evaluation → report. Each stage writes its folder and a `stage.json`
marker holding the hash of what it was built from; a re-run skips the stages whose marker still matches.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml
from pydantic import Field

from align.core.config import Section
from align.core.records import write_jsonl_atomic
from align.demo_eval import TOOL_STEP_TOKENS, evaluate, gold_of, gold_over_steps, interval, sample_policy, tool_use
from align.demo_labelling import GUIDELINES, run_labelling, write_labelling_help
from align.tools.agent import answer_matches, score_runs
from align.world import demo as world
from base_model.atomic import write_json_atomic

MODEL = {
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "seq_length": 256,
    "max_position_embeddings": 1024,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
}


class DemoConfig(Section):
    """Sizes and steps of the demo; `quick()` gives the small variant the tests run."""

    seed: int = 0
    vocab_size: int = Field(768, ge=300)  # 256 byte ranks + learned merges
    corpus_docs: int = 3000
    sft_conversations: int = 3000
    pmp_threads: int = 1500
    label_tasks: int = 600
    overlap: int = 3
    annotators: int = 8
    balance_n: int = 1200  # comparison pairs drawn tag-balanced for reward-model fine-tuning
    ppo_prompts: int = 1000
    ppo_eval_prompts: int = 48
    heldout_prompts: int = 300
    tool_questions: int = 80  # the held-out tool-use split, answered through the agent loop
    gold_samples: int = 2  # responses per held-out prompt and policy
    pack_seq_len: int = 128
    pretrain_steps: int = 300
    sft_steps: int = 800  # the copying that tool use needs (operands into the call, the result out) comes late
    pmp_epochs: float = 2.0
    rm_epochs: float = 4.0
    ppo_iterations: int = 30  # also GRPO's
    ppo_eval_every: int = 5
    dpo_epochs: float = 1.0
    max_new_tokens: int = 32

    @staticmethod
    def quick(seed: int = 0) -> "DemoConfig":
        return DemoConfig(
            seed=seed,
            corpus_docs=600,
            sft_conversations=600,
            pmp_threads=300,
            label_tasks=120,
            overlap=2,
            annotators=4,
            balance_n=200,
            ppo_prompts=200,
            ppo_eval_prompts=16,
            heldout_prompts=48,
            tool_questions=12,
            gold_samples=1,
            pretrain_steps=30,
            sft_steps=150,
            pmp_epochs=1.0,
            rm_epochs=1.0,
            ppo_iterations=6,
            ppo_eval_every=3,
            dpo_epochs=0.5,
            max_new_tokens=16,
        )


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    def __init__(self, cfg: DemoConfig, out: Path, log: Callable[[str], None] = print) -> None:
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def stage(
        self,
        index: int,
        total: int,
        name: str,
        inputs: dict,
        fn: Callable[[Path], None],
        code: tuple[Callable, ...] = (),
    ) -> None:
        """Run `fn(folder)` unless the folder's marker says it was built from the same inputs, the same upstream
        stages and the same code (the source of the functions in `code`, where the stage's recipe lives)."""
        folder = self.path(name)
        key = _digest({"inputs": inputs, "upstream": self.hashes, "code": [inspect.getsource(f) for f in code]})
        marker = folder / "stage.json"
        if marker.exists() and json.loads(marker.read_text()).get("key") == key:
            self.hashes[name] = key
            self.timings[name] = json.loads(marker.read_text())["seconds"]
            self.log(f"[{index}/{total}] {name}: reused ({folder})")
            return
        self.log(f"[{index}/{total}] {name} …")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        fn(folder)
        seconds = time.perf_counter() - t0
        write_json_atomic(marker, {"key": key, "seconds": seconds})  # written last: the stage is whole
        self.hashes[name], self.timings[name] = key, seconds
        self.log(f"[{index}/{total}] {name}: done in {seconds:.0f} s")


# ------------------------------------------------------------------------------------------------------ stages


def build_world(cfg: DemoConfig, folder: Path) -> None:
    """Every file the pipeline reads, from the seed alone (byte-identical for the same seed)."""
    s = cfg.seed * 1000
    write_jsonl_atomic(folder / "corpus.jsonl", world.pretraining_corpus(cfg.corpus_docs, s + 1))
    write_jsonl_atomic(folder / "sft.jsonl", world.sft_conversations(cfg.sft_conversations, s + 2))
    write_jsonl_atomic(folder / "pmp.jsonl", world.pmp_threads(cfg.pmp_threads, s + 3))
    write_jsonl_atomic(folder / "tasks.jsonl", world.candidates(cfg.label_tasks, s + 4))
    write_jsonl_atomic(folder / "ppo_prompts.jsonl", world.prompt_set(cfg.ppo_prompts, s + 5))
    write_jsonl_atomic(folder / "ppo_eval_prompts.jsonl", world.prompt_set(cfg.ppo_eval_prompts, s + 6))
    write_jsonl_atomic(folder / "heldout_prompts.jsonl", world.prompt_set(cfg.heldout_prompts, s + 7))
    write_jsonl_atomic(folder / "tool_questions.jsonl", world.tool_questions(cfg.tool_questions, s + 8))
    (folder / "taxonomy.yaml").write_text(
        yaml.safe_dump({"tags": world.TAXONOMY}, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    (folder / "guidelines.md").write_text(GUIDELINES, encoding="utf-8")


def learn_tokenizer(cfg: DemoConfig, world_dir: Path, folder: Path) -> None:
    from align.core.chatml import chat_turns
    from align.core.records import iter_documents
    from base_model import QwenTokenizer
    from base_model.pretrain.vocab import extend_ranks
    from base_model.tokenizer import save_ranks

    base = QwenTokenizer.load("bytes")
    texts = [t for _, _, t in iter_documents([world_dir / "corpus.jsonl"], "text")]
    for line in (world_dir / "sft.jsonl").read_text(encoding="utf-8").splitlines():  # as SFT renders them
        row = json.loads(line)
        texts += [text for turn in chat_turns(row["messages"], row.get("tools")) for text, _ in turn.pieces]
    ranks = extend_ranks(base.ranks, texts, cfg.vocab_size, min_frequency=2)
    save_ranks(ranks, folder / "qwen.tiktoken")


def _model_config(folder: Path) -> str:
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump(MODEL))
    return str(path)


def run_pretrain(cfg: DemoConfig, tok: Path, world_dir: Path, folder: Path) -> None:
    from base_model import QwenTokenizer
    from base_model.pretrain.packing import pack
    from base_model.pretrain.train import PretrainConfig, main

    pack([world_dir / "corpus.jsonl"], folder / "packed", QwenTokenizer.load(tok), cfg.pack_seq_len, "text", str(tok))
    main(
        PretrainConfig.model_validate(
            {
                "model": {"config": _model_config(folder), "tokenizer": str(tok), "fit_vocab": True},
                "data": {"train": str(folder / "packed"), "eval_rows": 16},
                "optim": {
                    "lr": 3e-3,
                    "schedule": "cosine",
                    "warmup_steps": 20,
                    "min_lr_ratio": 0.1,
                    "weight_decay": 0.1,
                    "grad_clip": 1.0,
                },
                "train": {
                    "micro_batch_size": 16,
                    "max_steps": cfg.pretrain_steps,
                    "log_every": 10,
                    "eval_every": max(cfg.pretrain_steps // 3, 1),
                    "seed": cfg.seed,
                },
                "out_dir": str(folder / "run"),
            }
        )
    )


def run_sft(cfg: DemoConfig, base: Path, world_dir: Path, folder: Path) -> None:
    from sft.train import SFTConfig, main

    main(
        SFTConfig.model_validate(
            {
                "model": {"init": str(base)},
                "data": {
                    "train": str(world_dir / "sft.jsonl"),
                    "max_len": SFT_MAX_LEN,
                    "packing": True,
                    "eval_fraction": 0.05,
                },
                "optim": {
                    "lr": 1e-3,
                    "schedule": "cosine",
                    "warmup_steps": 20,
                    "min_lr_ratio": 0.1,
                    "weight_decay": 0.0,
                    "grad_clip": 1.0,
                },
                "train": {
                    "micro_batch_size": 8,
                    "max_steps": cfg.sft_steps,
                    "log_every": 10,
                    "eval_every": max(cfg.sft_steps // 4, 1),
                    "seed": cfg.seed,
                },
                "out_dir": str(folder / "run"),
            }
        )
    )


def run_rm(cfg: DemoConfig, stage: str, init: dict, data: dict, epochs: float, folder: Path) -> None:
    from rm.train import RMConfig, main

    main(
        RMConfig.model_validate(
            {
                **init,
                "stage": stage,
                "data": {"max_len": 128, **data},
                "pooling": "end_token",
                "loss": {"lm_coef": 0.5},
                "optim": {
                    "lr": 1e-3,
                    "schedule": "cosine",
                    "warmup_steps": 10,
                    "min_lr_ratio": 0.1,
                    "weight_decay": 0.0,
                },
                "train": {"micro_batch_size": 16, "epochs": epochs, "log_every": 10, "seed": cfg.seed},
                "out_dir": str(folder / "run"),
            }
        )
    )


def run_ppo(
    cfg: DemoConfig,
    policy: Path,
    reward: Path,
    packed: Path,
    world_dir: Path,
    folder: Path,
    overrides: dict | None = None,
) -> None:
    from ppo.train import main

    main(ppo_config(cfg, policy, reward, packed, world_dir, folder / "run", overrides))


def run_dpo(cfg: DemoConfig, sft: Path, comparisons: Path, folder: Path) -> None:
    """DPO from the SFT policy on the comparisons the annotators made (the labelling export the RM trained on)."""
    from sft.dpo import DPOConfig, main

    main(
        DPOConfig.model_validate(
            {
                "model": {"init": str(sft)},
                "data": {"train": str(comparisons), "max_len": 256},
                "objective": {"loss": "dpo", "beta": 0.1},
                "optim": {"lr": DPO_LR, "schedule": "cosine", "warmup_steps": 5, "weight_decay": 0.0},
                "train": {"micro_batch_size": 16, "epochs": cfg.dpo_epochs, "log_every": 5, "seed": cfg.seed},
                "out_dir": str(folder / "run"),
            }
        )
    )


DPO_LR = 1e-4
SFT_MAX_LEN = 384  # a tool-use example (Qwen's ReAct instruction in the system turn) is about 330 tokens
GRPO = {"ppo.advantage": "grpo", "ppo.critic_warmup_steps": 0, "ppo.n_samples": 4, "ppo.rollout_batch_size": 8}


def ppo_config(
    cfg: DemoConfig,
    policy: Path,
    reward: Path,
    packed: Path,
    world_dir: Path,
    out_dir: Path,
    overrides: dict | None = None,
):
    """The demo's PPO stage config; `overrides` are dotted keys (what sweeps vary)."""
    from align.core.config import apply_overrides
    from ppo.train import PPOConfig

    data = {
        "models": {"policy": str(policy), "reward": str(reward)},
        "data": {
            "prompts": str(world_dir / "ppo_prompts.jsonl"),
            "eval_prompts": str(world_dir / "ppo_eval_prompts.jsonl"),
            "ptx": str(packed),
            "ptx_eval_rows": 8,
        },
        "ppo": {
            "iterations": cfg.ppo_iterations,
            "rollout_batch_size": 16,
            "n_samples": 2,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": 1.0,
            "top_p": 0.9,
            "ppo_epochs": 2,
            "mini_batch_size": 16,
            "kl_coef": 0.2,
            "ptx_coef": 0.5,
            "ptx_batch_size": 4,
            "critic_warmup_steps": 2,
            "sample_every": 5,
            "eval_samples": 2,
        },
        "policy_optim": {"lr": 5e-5, "schedule": "constant", "weight_decay": 0.0},
        "value_optim": {"lr": 1e-3, "schedule": "constant", "weight_decay": 0.0},
        "eval": {"judges": [{"kind": "function", "target": "align.world.demo:gold_judge", "name": "gold"}]},
        "train": {
            "micro_batch_size": 16,
            "eval_every": cfg.ppo_eval_every,
            "save_every": cfg.ppo_eval_every,
            "log_every": 1,
            "seed": cfg.seed,
        },
        "out_dir": str(out_dir),
    }
    if overrides:
        apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()])
    return PPOConfig.model_validate(data)


# -------------------------------------------------------------------------------------------------- evaluation


def run_demo(out: Path, quick: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    from align.report import write_report

    cfg = DemoConfig.quick(seed) if quick else DemoConfig(seed=seed)
    p = Pipeline(cfg, out, log)
    t0 = time.perf_counter()
    c = cfg.model_dump()
    total = 13
    w, tok = p.path("world"), p.path("tokenizer", "qwen.tiktoken")
    p.stage(
        1,
        total,
        "world",
        {
            k: c[k]
            for k in (
                "seed",
                "corpus_docs",
                "sft_conversations",
                "pmp_threads",
                "label_tasks",
                "ppo_prompts",
                "ppo_eval_prompts",
                "heldout_prompts",
                "tool_questions",
            )
        },
        lambda f: build_world(cfg, f),
        (build_world, *(getattr(world, n) for n in dir(world) if inspect.isfunction(getattr(world, n)))),
    )
    shutil.copyfile(w / "taxonomy.yaml", p.path("taxonomy.yaml"))
    p.stage(
        2, total, "tokenizer", {"vocab_size": cfg.vocab_size}, lambda f: learn_tokenizer(cfg, w, f), (learn_tokenizer,)
    )
    p.stage(
        3,
        total,
        "pretrain",
        {"steps": cfg.pretrain_steps, "seq": cfg.pack_seq_len, "model": MODEL},
        lambda f: run_pretrain(cfg, tok, w, f),
        (run_pretrain,),
    )
    base, packed = p.path("pretrain", "run", "final"), p.path("pretrain", "packed")
    p.stage(4, total, "sft", {"steps": cfg.sft_steps}, lambda f: run_sft(cfg, base, w, f), (run_sft,))
    p.stage(
        5,
        total,
        "rm_pmp",
        {"epochs": cfg.pmp_epochs},
        lambda f: run_rm(
            cfg,
            "pmp",
            {"model": {"init": str(base)}},
            {"train": str(w / "pmp.jsonl"), "binarize": True, "eval_fraction": 0.1},
            cfg.pmp_epochs,
            f,
        ),
        (run_rm,),
    )
    p.stage(
        6,
        total,
        "labels",
        {"overlap": cfg.overlap, "annotators": cfg.annotators},
        lambda f: run_labelling(cfg, w, f),
        (run_labelling,),
    )
    p.stage(
        7,
        total,
        "rm",
        {"epochs": cfg.rm_epochs, "balance_n": cfg.balance_n},
        lambda f: run_rm(
            cfg,
            "finetune",
            {"init": str(p.path("rm_pmp", "run", "final"))},
            {"train": str(p.path("labels", "export.jsonl")), "balance_n": cfg.balance_n, "eval_fraction": 0.1},
            cfg.rm_epochs,
            f,
        ),
        (run_rm,),
    )
    sft, rm = p.path("sft", "run", "final"), p.path("rm", "run", "final")
    p.stage(
        8,
        total,
        "ppo",
        {"iterations": cfg.ppo_iterations, "eval_every": cfg.ppo_eval_every},
        lambda f: run_ppo(cfg, sft, rm, packed, w, f),
        (run_ppo, ppo_config),
    )
    p.stage(
        9,
        total,
        "grpo",
        {"iterations": cfg.ppo_iterations, "eval_every": cfg.ppo_eval_every, **GRPO},
        lambda f: run_ppo(cfg, sft, rm, packed, w, f, GRPO),
        (run_ppo, ppo_config),
    )
    p.stage(
        10,
        total,
        "dpo",
        {"epochs": cfg.dpo_epochs, "lr": DPO_LR},
        lambda f: run_dpo(cfg, sft, p.path("labels", "export.jsonl"), f),
        (run_dpo,),
    )
    models = {
        "base": base,
        "sft": sft,
        "ppo": p.path("ppo", "run", "final", "policy"),
        "grpo": p.path("grpo", "run", "final", "policy"),
        "dpo": p.path("dpo", "run", "final"),
    }
    p.stage(
        11,
        total,
        "eval",
        {"gold_samples": cfg.gold_samples},
        lambda f: write_json_atomic(f / "summary.json", evaluate(cfg, models, p.path("ppo", "run"), w, f)),
        (evaluate, sample_policy, gold_of, interval, gold_over_steps),
    )
    p.stage(
        12,
        total,
        "tools",
        {"tool_questions": cfg.tool_questions, "step_tokens": TOOL_STEP_TOKENS},
        lambda f: write_json_atomic(
            f / "summary.json", tool_use(cfg, {k: models[k] for k in ("base", "sft", "ppo")}, w, f), indent=1
        ),
        (tool_use, score_runs, answer_matches),
    )
    summary = json.loads(p.path("eval", "summary.json").read_text())
    summary["tools"] = json.loads(p.path("tools", "summary.json").read_text())
    summary.update(pipeline_figures(p))
    summary["mode"] = "quick" if quick else "full"
    summary["tokenizer"] = {
        "kind": "byte-level BPE learned on the demo corpus",
        "path": str(tok),
        "vocab_size": cfg.vocab_size,
    }
    summary["seconds"] = {**p.timings, "total_this_run": time.perf_counter() - t0}
    write_json_atomic(p.path("summary.json"), summary, indent=1)
    log(f"[13/{total}] report …")
    report = write_report(p.out)
    write_labelling_help(p)
    return {"summary": summary, "report": report}


def pipeline_figures(p: Pipeline) -> dict:
    """Figures of the stages, read from their metrics files."""
    from align.core.metrics import read_metrics

    def last(run: Path, key: str):
        vals = [r[key] for r in read_metrics(run) if key in r]
        return vals[-1] if vals else None

    agreement = json.loads(p.path("labels", "agreement.json").read_text())
    return {
        "pretrain": {"eval_loss": last(p.path("pretrain", "run"), "eval/loss")},
        "sft": {"eval_loss": last(p.path("sft", "run"), "eval/loss")},
        "rm_pmp": {"eval_accuracy": last(p.path("rm_pmp", "run"), "eval/accuracy")},
        "rm": {"eval_accuracy": last(p.path("rm", "run"), "eval/accuracy")},
        "labels": {
            "agreement": agreement["overall"],
            "annotators": len(agreement["annotators"]),
            "flagged": len(agreement["flagged"]),
        },
        **{
            name: {
                "eval_reward_first": _first(p.path(name, "run"), "eval/reward_mean"),
                "eval_reward_last": last(p.path(name, "run"), "eval/reward_mean"),
                "eval_kl_last": last(p.path(name, "run"), "eval/kl"),
                "ptx_loss_last": last(p.path(name, "run"), "eval/ptx_loss"),
            }
            for name in ("ppo", "grpo")
        },
        "dpo": {
            "train_accuracy_last": last(p.path("dpo", "run"), "train/accuracy"),
            "logratio_chosen_last": last(p.path("dpo", "run"), "train/logratio_chosen"),
        },
    }


def _first(run: Path, key: str):
    from align.core.metrics import read_metrics

    vals = [r[key] for r in read_metrics(run) if key in r]
    return vals[0] if vals else None
