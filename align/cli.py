"""The `align` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
        raise ConfigError(f"{args.config}: vocab_size {config.vocab_size} is smaller than the tokenizer "
                          f"({len(tokenizer)} ids); pass --fit-vocab")
    model = QwenForCausalLM(config, seed=args.seed)
    save_pretrained(model, args.out, tokenizer)
    print(f"wrote {config.num_parameters():,}-parameter model to {args.out}")


def _sampling(args: argparse.Namespace, tokenizer):
    from base_model.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        stop_token_ids=(tokenizer.im_end_id, tokenizer.eod_id), seed=args.seed, vocab_limit=len(tokenizer),
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from align.core.chatml import render
    from base_model import QwenTokenizer, load_pretrained
    from base_model.generate import generate

    model = load_pretrained(args.model, device=engine_device())
    tokenizer = QwenTokenizer.from_file(args.model)
    prompts = args.prompt
    if args.raw:
        ids = [tokenizer.encode(p) for p in prompts]
    else:
        messages = lambda p: ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": p}]
        ids = [render(messages(p), tokenizer, add_generation_prompt=True) for p in prompts]
    out = generate(model, ids, _sampling(args, tokenizer), pad_id=tokenizer.pad_id)
    for prompt, tokens in zip(prompts, out.token_ids):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)


def cmd_chat(args: argparse.Namespace) -> None:
    from align.core.chatml import render
    from base_model import QwenTokenizer, load_pretrained
    from base_model.generate import generate

    model = load_pretrained(args.model, device=engine_device())
    tokenizer = QwenTokenizer.from_file(args.model)
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
        out = generate(model, [ids], _sampling(args, tokenizer), pad_id=tokenizer.pad_id)
        reply = tokenizer.decode(out.token_ids[0], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}")


def cmd_convert(args: argparse.Namespace) -> None:
    from base_model import convert

    convert(args.src, args.dst, max_shard_bytes=int(args.max_shard_mb * 1024**2))
    print(f"wrote Qwen2-format checkpoint to {args.dst}")


def cmd_sft(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from sft.train import SFTConfig, main

    main(load_config(SFTConfig, args.config, args.overrides))


def cmd_sft_preview(args: argparse.Namespace) -> None:
    from base_model import QwenTokenizer
    from sft.preview import preview

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
    metrics = evaluate_file(str(args.model), str(args.data), args.max_len, args.batch_size, report)
    if args.json:
        print(dump_metrics(metrics))
    else:
        o = metrics["overall"]
        print(f"pairwise accuracy {o['accuracy']:.4f} over {o['n']} pairs, 95% CI [{o['ci95'][0]:.4f}, "
              f"{o['ci95'][1]:.4f}]; length-only baseline {metrics['length_baseline']['accuracy']:.4f}")
        for source, v in metrics["per_source"].items():
            print(f"  {source}: {v['accuracy']:.4f} ({v['n']} pairs)")
        print(f"report: {report}")


def cmd_rm_score(args: argparse.Namespace) -> None:
    from rm.eval import score_file

    n = score_file(str(args.model), str(args.data), str(args.out), args.max_len, args.batch_size, args.normalise)
    print(f"scored {n} records into {args.out}")


def _read_rows(path):
    from align.core.records import iter_records

    return list(iter_records(path))


def _write_rows(path: Path, rows: list[dict]) -> None:
    from align.core.records import write_jsonl_atomic

    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(path)
    else:
        write_jsonl_atomic(path, rows)


def cmd_tags_build(args: argparse.Namespace) -> None:
    import json

    from rm.tags.builder import build

    rows = _read_rows(args.input)
    raw = [[str(t) for t in (r.get(args.tags_field) or [])] for _, r in rows]
    result = build(raw, args.alpha, args.eps, args.min_confidence, args.min_support)
    args.out.mkdir(parents=True, exist_ok=True)
    result.taxonomy.save(args.out / "taxonomy.yaml")
    _write_rows(args.out / "merges.jsonl", result.merges)
    (args.out / "mapping.json").write_text(json.dumps(result.mapping, indent=2, ensure_ascii=False))
    print(f"{len(result.mapping)} raw tags (after dropping {len(result.dropped)} seen fewer than {args.alpha} times) "
          f"-> {len(result.taxonomy)} tags; {len(result.merges)} merges in {args.out / 'merges.jsonl'}")


def cmd_tags_assign(args: argparse.Namespace) -> None:
    import json

    from rm.tags.tagger import assign
    from rm.tags.taxonomy import Taxonomy

    rows, report = assign(_read_rows(args.input), Taxonomy.load(args.taxonomy), args.method, args.threshold,
                          args.top_k, args.endpoint, args.model, args.on_unknown)
    _write_rows(args.output, rows)
    print(json.dumps(report, ensure_ascii=False))


def cmd_tags_sample(args: argparse.Namespace) -> None:
    from align.core.records import DataError
    from rm.tags.sampler import max_min_ratio, sample, tag_matrix

    rows = _read_rows(args.input)
    for where, r in rows:
        if not isinstance(r.get(args.tags_field), list):
            raise DataError(f"{where}: field '{args.tags_field}' must be a list of tags")
    m, _ = tag_matrix([r[args.tags_field] for _, r in rows])
    chosen = sample(m, args.n, args.method, args.seed, args.cap, args.temperature)
    _write_rows(args.output, [rows[i][1] for i in chosen])
    print(f"sampled {len(chosen)} of {len(rows)} rows ({args.method}); max/min tag frequency "
          f"{max_min_ratio(m, chosen):.1f} (whole input: {max_min_ratio(m, list(range(len(rows)))):.1f})")


def cmd_tags_audit(args: argparse.Namespace) -> None:
    from rm.tags.audit import audit
    from rm.tags.taxonomy import Taxonomy

    result = audit(args.dataset, args.out, args.against, Taxonomy.load(args.taxonomy) if args.taxonomy else None,
                   args.k)
    f = result["figures"]
    print(f"coverage {f['coverage']:.3f}, entropy {f['entropy']:.3f}, Gini {f['gini']:.3f}, "
          f"{f['tags_under_k']} tags under {args.k} examples; report: {args.out / 'report.html'}")


def cmd_label_users_add(args: argparse.Namespace) -> None:
    import getpass

    from labeling_ui.auth import hash_password
    from labeling_ui.store import Store

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
    if not password:
        raise ConfigError("an empty password is not allowed (give it on stdin)")
    Store(args.db).add_user(args.name, args.role, hash_password(password))
    print(f"added {args.role} {args.name}")


def cmd_label_import(args: argparse.Namespace) -> None:
    from align.core.records import DataError
    from labeling_ui.api import validate_items
    from labeling_ui.store import Store
    from rm.tags.taxonomy import Taxonomy

    rows, problems = [], []
    for lineno, line in enumerate(args.file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{args.file}:{lineno}: not valid JSON ({e.msg})")
    known = set(Taxonomy.load(args.taxonomy).tags) if args.taxonomy else None
    problems += [f"{args.file}:{rows[int(e.split()[1].rstrip(':'))][0]}:{e.split(':', 1)[1]}"
                 for e in validate_items([r for _, r in rows], known)]
    if problems:
        raise DataError("import refused; nothing was imported:\n  " + "\n  ".join(problems))
    guidelines = args.guidelines.read_text(encoding="utf-8") if args.guidelines else None
    n = Store(args.db).import_tasks(args.project, [r for _, r in rows], args.overlap, guidelines)
    print(f"imported {n} tasks into {args.project} (overlap {args.overlap})")


def cmd_label_export(args: argparse.Namespace) -> None:
    from align.core.records import write_jsonl_atomic
    from labeling_ui.export import comparison_record
    from labeling_ui.store import Store

    records = [r for t, anns in Store(args.db).annotations(args.project)
               if (r := comparison_record(t, anns, args.rule)) is not None]
    write_jsonl_atomic(args.out, records)
    print(f"exported {len(records)} comparison records to {args.out}")


def cmd_label_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from labeling_ui.store import Store
    from labeling_ui.web import create_server
    from rm.tags.taxonomy import Taxonomy

    db, taxonomy = args.db, args.taxonomy
    if args.demo is not None:
        demo_db = args.demo / "labels" / "labels.db"
        if not demo_db.exists():
            raise ConfigError(f"{demo_db} does not exist: run `align demo --out {args.demo}` first")
        db, taxonomy = f"sqlite:///{demo_db}", args.demo / "taxonomy.yaml"
        if (args.demo / "labelling.txt").exists():
            print((args.demo / "labelling.txt").read_text(encoding="utf-8"))
    known = set(Taxonomy.load(taxonomy).tags) if taxonomy else None
    print(f"labelling app on http://{args.host}:{args.port}/ (REST API under /api), database {db}")
    uvicorn.run(create_server(Store(db), known), host=args.host, port=args.port)


def cmd_label_generate(args: argparse.Namespace) -> None:
    from labeling_ui.candidates import generate_candidates

    n = generate_candidates(args.model, args.prompts, args.out, args.k, args.max_new_tokens, args.seed)
    print(f"wrote {n} tasks with {args.k} candidate responses each to {args.out} "
          f"(import them with `align label import --file {args.out}`)")


def cmd_demo(args: argparse.Namespace) -> None:
    from align.demo import run_demo

    out = run_demo(args.out, quick=args.quick, seed=args.seed)
    g = out["summary"]["gold"]
    d = g["ppo_minus_sft"]
    print(f"gold score on held-out prompts: base {g['base']['mean']:.3f}, SFT {g['sft']['mean']:.3f}, "
          f"PPO {g['ppo']['mean']:.3f}; PPO - SFT {d['mean']:+.3f} (95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})")
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


def cmd_ppo(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from ppo.train import PPOConfig, main

    main(load_config(PPOConfig, args.config, args.overrides))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from base_model.pretrain.train import PretrainConfig, main

    main(load_config(PretrainConfig, args.config, args.overrides))


def cmd_data_pack(args: argparse.Namespace) -> None:
    from base_model import QwenTokenizer
    from base_model.pretrain.packing import pack

    index = pack(args.input, args.output, QwenTokenizer.load(args.tokenizer), args.seq_len, args.text_field,
                 str(args.tokenizer))
    print(f"packed {index['n_docs']} documents ({index['n_tokens']} tokens) into {index['n_rows']} rows of "
          f"{index['seq_len']} at {args.output}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt (default: Qwen's 'You are a helpful assistant.')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align", description="RLHF alignment workbench: the Qwen alignment pipeline as commands."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("init-model", help="write a randomly initialised model from a model config")
    p.add_argument("config", type=Path, help="model config YAML, e.g. configs/model/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--tokenizer", default="cl100k_base", help="'cl100k_base', 'bytes' or a qwen.tiktoken ranks file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fit-vocab", action="store_true", help="set vocab_size to the tokenizer's size (rounded up to 128)")
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
    p.add_argument("--max-window-size", type=int, default=6144, help="drop the oldest turns beyond this many tokens")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=256)

    p = sub.add_parser("sft", help="ChatML supervised fine-tuning (`align sft preview` shows the trained tokens)")
    p.add_argument("config", type=Path, help="SFT config YAML, e.g. configs/sft/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("sft-preview", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--tokenizer", default="cl100k_base", help="'cl100k_base', 'bytes', a ranks file or a checkpoint")
    p.add_argument("--mask-mode", choices=["assistant", "qwen", "none"], default="assistant")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--limit", type=int, default=3, help="conversations to show")
    p.add_argument("--plain", action="store_true", help="mark trained text with ⟦ ⟧ instead of colour")
    p.set_defaults(func=cmd_sft_preview)
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "sft-preview"]  # reached as `sft preview`

    p = sub.add_parser("rm", help="reward model: pmp | train | eval | score")
    rm_sub = p.add_subparsers(dest="rm_command", metavar="pmp|train|eval|score")
    rm_sub.required = True
    for name, text in (("pmp", "preference model pretraining on forum threads or comparison pairs"),
                       ("train", "fine-tune on human comparisons (init=PMP_CHECKPOINT)")):
        q = rm_sub.add_parser(name, help=text)
        q.add_argument("config", type=Path)
        q.add_argument("overrides", nargs="*")
        q.set_defaults(func=cmd_rm)
    q = rm_sub.add_parser("eval", help="pairwise accuracy, per tag and source, calibration; an HTML report")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--json", action="store_true", help="print every figure as JSON")
    q.add_argument("--report", type=Path, default=None, help="HTML report path (default: MODEL/eval_report.html)")
    q.add_argument("--max-len", type=int, default=2048)
    q.add_argument("--batch-size", type=int, default=16)
    q.set_defaults(func=cmd_rm_eval)
    q = rm_sub.add_parser("score", help="score conversations in batches")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--normalise", action="store_true", help="standardise with the saved training statistics")
    q.add_argument("--max-len", type=int, default=2048)
    q.add_argument("--batch-size", type=int, default=16)
    q.set_defaults(func=cmd_rm_score)

    p = sub.add_parser("tags", help="tag taxonomy: build | assign | sample | audit")
    tags_sub = p.add_subparsers(dest="tags_command", metavar="build|assign|sample|audit")
    tags_sub.required = True
    q = tags_sub.add_parser("build", help="open-set raw tags -> a taxonomy (InsTag's four steps)")
    q.add_argument("--input", type=Path, required=True, help="JSONL/Parquet rows with a list of raw tags")
    q.add_argument("--out", type=Path, required=True, help="folder for taxonomy.yaml, merges.jsonl, mapping.json")
    q.add_argument("--tags-field", default="tags")
    q.add_argument("--alpha", type=int, default=2, help="drop raw tags seen fewer times")
    q.add_argument("--eps", type=float, default=0.3, help="DBSCAN cosine distance for semantic merges")
    q.add_argument("--min-confidence", type=float, default=0.95, help="FP-Growth confidence, both directions")
    q.add_argument("--min-support", type=float, default=0.001)
    q.set_defaults(func=cmd_tags_build)
    q = tags_sub.add_parser("assign", help="tag rows onto a taxonomy")
    q.add_argument("--input", type=Path, required=True)
    q.add_argument("--output", type=Path, required=True)
    q.add_argument("--taxonomy", type=Path, required=True)
    q.add_argument("--method", choices=["data", "embedding", "llm"], default="data")
    q.add_argument("--threshold", type=float, default=0.35, help="minimum cosine similarity (embedding)")
    q.add_argument("--top-k", type=int, default=3)
    q.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL for --method llm")
    q.add_argument("--model", default="default", help="model name sent to the endpoint")
    q.add_argument("--on-unknown", choices=["error", "drop"], default="error", help="data tags not in the taxonomy")
    q.set_defaults(func=cmd_tags_assign)
    q = tags_sub.add_parser("sample", help="tag-balanced sampling; output rows are input rows, unchanged")
    q.add_argument("--input", type=Path, required=True)
    q.add_argument("--output", type=Path, required=True)
    q.add_argument("--n", type=int, required=True)
    q.add_argument("--method", choices=["complexity-first", "capped", "temperature"], default="complexity-first")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--cap", type=int, default=None, help="per-tag cap (capped; default: water-filling)")
    q.add_argument("--temperature", type=float, default=2.0, help="T5-style temperature (temperature)")
    q.add_argument("--tags-field", default="tags")
    q.set_defaults(func=cmd_tags_sample)
    q = tags_sub.add_parser("audit", help="what a sample contains: coverage, balance, safety, labels")
    q.add_argument("dataset", type=Path)
    q.add_argument("--against", type=Path, default=None, help="the original pool the sample came from")
    q.add_argument("--taxonomy", type=Path, default=None)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--k", type=int, default=5, help="flag tags with fewer examples")
    q.set_defaults(func=cmd_tags_audit)

    p = sub.add_parser("label", help="labelling: serve (web page + REST API) | users | import | generate | export")
    label_sub = p.add_subparsers(dest="label_command", metavar="serve|users|import|generate|export")
    label_sub.required = True
    q = label_sub.add_parser("serve", help="serve the web page (/) and the JSON REST API (/api)")
    q.add_argument("--db", default="sqlite:///labels.db", help="SQLAlchemy URL (sqlite:///… or postgresql://…)")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=7860)
    q.add_argument("--taxonomy", type=Path, default=None, help="taxonomy YAML: tags offered and checked on import")
    q.add_argument("--demo", type=Path, nargs="?", const=Path("align-demo"), default=None,
                   help="serve the labelling data of an `align demo` run (default folder align-demo)")
    q.set_defaults(func=cmd_label_serve)
    q = label_sub.add_parser("generate", help="K candidate responses per prompt from a checkpoint, as tasks JSONL")
    q.add_argument("--model", type=Path, required=True, help="checkpoint folder (align init-model / sft output)")
    q.add_argument("--prompts", type=Path, required=True, help="JSONL with 'prompt' (text or messages), 'tags'")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--k", type=int, default=4, help="responses per prompt, each with its own sampling setting")
    q.add_argument("--max-new-tokens", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_label_generate)
    q = label_sub.add_parser("users", help="manage accounts: users add NAME --role ROLE (password on stdin)")
    users_sub = q.add_subparsers(dest="users_command", metavar="add")
    users_sub.required = True
    r = users_sub.add_parser("add")
    r.add_argument("name")
    r.add_argument("--role", choices=["annotator", "reviewer", "admin"], required=True)
    r.add_argument("--db", default="sqlite:///labels.db")
    r.set_defaults(func=cmd_label_users_add)
    q = label_sub.add_parser("import", help="import tasks (JSONL: prompt, responses, tags); all or nothing")
    q.add_argument("--project", required=True)
    q.add_argument("--file", type=Path, required=True)
    q.add_argument("--overlap", type=int, default=1, help="distinct annotators per item")
    q.add_argument("--guidelines", type=Path, default=None, help="Markdown shown beside every task")
    q.add_argument("--taxonomy", type=Path, default=None, help="refuse tags that are not in this taxonomy")
    q.add_argument("--db", default="sqlite:///labels.db")
    q.set_defaults(func=cmd_label_import)
    q = label_sub.add_parser("export", help="comparison records for `align rm train`")
    q.add_argument("--project", required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--rule", choices=["majority", "ranked_pairs"], default="majority")
    q.add_argument("--db", default="sqlite:///labels.db")
    q.set_defaults(func=cmd_label_export)

    p = sub.add_parser("demo", help="the whole pipeline on the demo world: tokenizer → pretrain → SFT → PMP → "
                                     "labelling → RM → PPO → gold evaluation → report")
    p.add_argument("--out", type=Path, default=Path("align-demo"), help="output folder (re-runs reuse its stages)")
    p.add_argument("--quick", action="store_true", help="the small variant (a few minutes; what the tests run)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="grid or random search over PPO settings on the demo world (resumable)")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file (e.g. out_dir=runs/s2)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="the HTML report of a demo or sweep folder, from its metrics files")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="performance side by side with the usual peers (peak, model, generate, ppo, tags)")
    p.add_argument("suites", nargs="*", help="suites to run (default: all)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ppo", help="PPO with a reward model, a value model, a reference policy and ptx")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("pretrain", help="pretraining / continued pretraining on packed data")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("data", help="pretraining data: pack | dedup | filter | decontaminate")
    data_sub = p.add_subparsers(dest="data_command", metavar="pack|dedup|filter|decontaminate")
    data_sub.required = True
    q = data_sub.add_parser("pack", help="tokenise and pack documents into fixed-length rows")
    q.add_argument("--input", nargs="+", required=True, type=Path, help="JSONL or Parquet files")
    q.add_argument("--output", required=True, type=Path, help="packed folder")
    q.add_argument("--tokenizer", default="cl100k_base", help="'cl100k_base', 'bytes', a ranks file or checkpoint")
    q.add_argument("--seq-len", type=int, default=2048)
    q.add_argument("--text-field", default="text")
    q.set_defaults(func=cmd_data_pack)
    _add_data_commands(data_sub)

    p = sub.add_parser("tokenizer", help="vocabulary tools: extend")
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="extend")
    tok_sub.required = True
    q = tok_sub.add_parser("extend", help="learn extra BPE merges on a corpus, starting from a base vocabulary")
    q.add_argument("--base", default="cl100k_base", help="'cl100k_base', 'bytes' or a ranks file")
    q.add_argument("--corpus", nargs="+", required=True, type=Path, help="JSONL or Parquet with a text field")
    q.add_argument("--vocab-size", type=int, required=True, help="number of ranks in the result")
    q.add_argument("--output", type=Path, required=True)
    q.add_argument("--min-frequency", type=int, default=2)
    q.add_argument("--text-field", default="text")
    q.set_defaults(func=cmd_tokenizer_extend)

    p = sub.add_parser("convert", help="convert a Qwen v1 or Qwen2 checkpoint to Hugging Face Qwen2 format")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--max-shard-mb", type=float, default=2048)
    p.set_defaults(func=cmd_convert)
    return parser


def engine_device():
    from align.core.distributed import device

    return device()


def main(argv: list[str] | None = None) -> int:
    from align.core.records import DataError
    from base_model import CheckpointError
    from base_model.tokenizer import TokenizerFileError
    from rm.tags.taxonomy import TaxonomyError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["sft", "preview"]:
        argv = ["sft-preview"] + argv[2:]
    args, extra = parser.parse_known_args(argv)
    # dotted key=value overrides may come anywhere on the line, also after options
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (ConfigError, CheckpointError, TokenizerFileError, DataError, TaxonomyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0



def cmd_data_dedup(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from base_model.pretrain.dedup import dedup

    report_path = args.report or args.output.with_name(args.output.stem + ".dedup_report.jsonl")
    with tqdm(desc="dedup", unit="doc") as bar:
        report = dedup(args.input, args.output, args.threshold, args.text_field, args.num_perm,
                       report_path=report_path, progress=lambda n: bar.update(n - bar.n))
    print(f"{report.documents} documents: kept {report.kept}, dropped {report.exact_dropped} exact and "
          f"{report.near_dropped} near duplicates in {len(report.clusters)} clusters; report: {report_path}")


def cmd_data_filter(args: argparse.Namespace) -> None:
    from align.core.config import load_config
    from base_model.pretrain.quality import QualityRules, filter_documents

    rules = load_config(QualityRules, args.rules, args.overrides) if args.rules else load_config(
        QualityRules, None, args.overrides)
    if args.banned_words:
        rules.banned_words = [w.strip() for w in args.banned_words.read_text().splitlines() if w.strip()]
    counts = filter_documents(args.input, args.output, rules, args.text_field, args.model, args.rejected)
    kept = counts.pop("kept", 0)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))
    print(f"kept {kept} documents; dropped {sum(counts.values())}" + (f" ({reasons})" if reasons else ""))


def cmd_data_decontaminate(args: argparse.Namespace) -> None:
    from base_model.pretrain.decontam import decontaminate

    report_path = args.report or args.output.with_name(args.output.stem + ".decontam_report.json")
    report = decontaminate(args.input, args.output, args.against, args.n, args.text_field, report_path)
    print(f"kept {report['kept']} documents, dropped {report['dropped']} sharing a {args.n}-gram with an "
          f"evaluation item; report: {report_path}")


def cmd_tokenizer_extend(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from base_model import QwenTokenizer
    from base_model.pretrain.packing import iter_texts
    from base_model.pretrain.vocab import SAMPLES, bytes_per_token, extend_ranks
    from base_model.tokenizer import save_ranks

    base = QwenTokenizer.load(args.base)
    texts = (t for _, t in iter_texts(args.corpus, args.text_field))
    with tqdm(desc="merges", total=args.vocab_size, initial=len(base.ranks)) as bar:
        ranks = extend_ranks(base.ranks, texts, args.vocab_size, args.min_frequency,
                             progress=lambda n: bar.update(n - bar.n))
    save_ranks(ranks, args.output)
    extended = QwenTokenizer(ranks)
    print(f"wrote {len(ranks)} ranks ({len(ranks) - len(base.ranks)} new) to {args.output}")
    print(f"{'sample':<10}{'bytes/token ' + str(args.base):>28}{'bytes/token extended':>24}")
    for name, text in SAMPLES.items():
        print(f"{name:<10}{bytes_per_token(base.encode, text):>28.3f}{bytes_per_token(extended.encode, text):>24.3f}")


def _add_data_commands(data_sub) -> None:
    q = data_sub.add_parser("dedup", help="exact and MinHash-LSH near-duplicate removal")
    q.add_argument("--input", nargs="+", required=True, type=Path)
    q.add_argument("--output", required=True, type=Path, help=".jsonl or .parquet")
    q.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    q.add_argument("--text-field", default="text")
    q.add_argument("--num-perm", type=int, default=128)
    q.add_argument("--report", type=Path, default=None, help="clusters removed (default: beside the output)")
    q.set_defaults(func=cmd_data_dedup)
    q = data_sub.add_parser("filter", help="Gopher-style rules and reference-model perplexity")
    q.add_argument("--input", nargs="+", required=True, type=Path)
    q.add_argument("--output", required=True, type=Path)
    q.add_argument("--rejected", type=Path, default=None, help="also write dropped documents with their scores")
    q.add_argument("--rules", type=Path, default=None, help="YAML of thresholds (see QualityRules)")
    q.add_argument("--model", type=Path, default=None, help="reference model for perplexity")
    q.add_argument("--banned-words", type=Path, default=None, help="one word or phrase per line")
    q.add_argument("--text-field", default="text")
    q.add_argument("overrides", nargs="*", help="rule overrides, e.g. min_words=20 max_perplexity=500")
    q.set_defaults(func=cmd_data_filter)
    q = data_sub.add_parser("decontaminate", help="drop documents sharing an n-gram with evaluation items")
    q.add_argument("--input", nargs="+", required=True, type=Path)
    q.add_argument("--output", required=True, type=Path)
    q.add_argument("--against", nargs="+", required=True, type=Path, help="evaluation files (JSONL/Parquet)")
    q.add_argument("--n", type=int, default=13)
    q.add_argument("--text-field", default="text")
    q.add_argument("--report", type=Path, default=None)
    q.set_defaults(func=cmd_data_decontaminate)


if __name__ == "__main__":
    sys.exit(main())
