"""`align data | tokenizer | tags`: argument parsing only; each handler calls one library function and prints its result."""

from __future__ import annotations

import argparse
from pathlib import Path

from align.cli.numbers import amount, count


def cmd_data_pack(args: argparse.Namespace) -> None:
    from base_model import QwenTokenizer
    from base_model.pretrain.packing import pack, pack_mix

    tokenizer = QwenTokenizer.load(args.tokenizer)
    if args.mix:
        from tqdm import tqdm

        sources = []
        for item in args.mix:
            path, sep, weight = item.rpartition(":")
            try:
                sources.append((path, float(weight)))
            except ValueError:
                raise SystemExit(f"error: --mix {item!r}: expected FILE:WEIGHT, e.g. code.jsonl:0.9") from None
            if not sep:
                raise SystemExit(f"error: --mix {item!r}: expected FILE:WEIGHT, e.g. code.jsonl:0.9")
        with tqdm(desc="tokenise", unit="doc") as bar:
            index = pack_mix(sources, args.output, tokenizer, args.seq_len, args.text_field, str(args.tokenizer),
                             args.tokens, args.decontaminate_against, args.ngram, args.seed, bar.update)  # fmt: skip
        for s in index["mix"]:
            print(
                f"  {s['source']}: weight {s['weight']:.3f}, share {s['share']:.4f} ({s['tokens_packed']} tokens, "
                f"{s['passes']} pass(es)), {s['contaminated_dropped']} contaminated documents dropped"
            )
    elif args.input:
        index = pack(args.input, args.output, tokenizer, args.seq_len, args.text_field, str(args.tokenizer))
    else:
        raise SystemExit("error: align data pack needs --input FILE … or --mix FILE:WEIGHT …")
    print(
        f"packed {index['n_docs']} documents ({index['n_tokens']} tokens) into {index['n_rows']} rows of "
        f"{index['seq_len']} at {args.output}"
    )


def cmd_data_dedup(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from base_model.pretrain.dedup import dedup

    report_path = args.report or args.output.with_name(args.output.stem + ".dedup_report.jsonl")
    with tqdm(desc="dedup", unit="doc") as bar:
        report = dedup(
            args.input,
            args.output,
            args.threshold,
            args.text_field,
            args.num_perm,
            report_path=report_path,
            progress=lambda n: bar.update(n - bar.n),
            code=args.code,
        )
    print(
        f"{report.documents} documents: kept {report.kept}, dropped {report.exact_dropped} exact and "
        f"{report.near_dropped} near duplicates in {len(report.clusters)} clusters; report: {report_path}"
    )


def cmd_data_filter(args: argparse.Namespace) -> None:
    if args.classifier:
        from base_model.pretrain.classifier import classify_documents

        counts = classify_documents(
            args.input, args.output, args.classifier, args.min_score, args.max_score, args.text_field, args.rejected
        )
        print(
            f"kept {counts['kept']} documents; dropped {counts['below_min_score']} below --min-score and "
            f"{counts['above_max_score']} above --max-score"
        )
        return
    from align.core.config import load_config
    from base_model.pretrain.quality import QualityRules, filter_documents

    rules = (
        load_config(QualityRules, args.rules, args.overrides)
        if args.rules
        else load_config(QualityRules, None, args.overrides)
    )
    if args.banned_words:
        rules.banned_words = [w.strip() for w in args.banned_words.read_text().splitlines() if w.strip()]
    from tqdm import tqdm

    with tqdm(desc="filter", unit="doc") as bar:
        counts = filter_documents(
            args.input, args.output, rules, args.text_field, args.model, args.rejected, progress=bar.update
        )
    kept = counts.pop("kept", 0)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))
    print(f"kept {kept} documents; dropped {sum(counts.values())}" + (f" ({reasons})" if reasons else ""))


def cmd_data_train_classifier(args: argparse.Namespace) -> None:
    from base_model.pretrain.classifier import train_classifier

    card = train_classifier(args.positive, args.negative, args.out, args.text_field, args.heldout, args.seed)
    h = card["heldout"]
    print(
        f"trained on {card['documents']['positive']} positive and {card['documents']['negative']} negative documents; "
        f"held out {h['documents']}: precision {h['precision']:.3f}, recall {h['recall']:.3f}, F1 {h['f1']:.3f}, "
        f"ROC AUC {h['roc_auc']:.3f} at 0.5"
    )
    print("threshold  precision  recall")
    for row in h["at_thresholds"]:
        print(f"{row['threshold']:>9.1f}  {row['precision']:>9.3f}  {row['recall']:>6.3f}")
    print(f"wrote {args.out} and {args.out}.json")


def cmd_data_self_instruct(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from tqdm import tqdm

    from align.cli.tools import backend_from_args
    from align.tools.agent import Agent, text_completer
    from sft.self_instruct import read_seed_tasks, self_instruct, tool_use_self_instruct

    backend = backend_from_args(args)
    complete = text_completer(backend)
    seeds = read_seed_tasks(str(args.seed_tasks))
    if args.tools:
        from align.tools.builtin import builtin_tools

        tools = builtin_tools(args.tools.split(","), Path(tempfile.mkdtemp(prefix="align-self-instruct-")))
        agent = Agent(backend, tools, max_steps=args.max_steps)
        try:
            report = tool_use_self_instruct(complete, agent, [t["instruction"] for t in seeds], args.n, args.out,
                                            args.seed, args.max_rounds)  # fmt: skip
        finally:
            agent.close()
    else:
        with tqdm(total=args.n, desc="self-instruct", unit="instruction") as bar:
            report = self_instruct(complete, seeds, args.n, args.out, args.seed, bar.update, args.max_rounds)
    print(json.dumps(report, indent=1))
    print(f"kept {report['kept']} of {report['generated']} generated; {args.out}, report {args.out}.report.json")


def cmd_data_decontaminate(args: argparse.Namespace) -> None:
    from base_model.pretrain.decontam import decontaminate

    report_path = args.report or args.output.with_name(args.output.stem + ".decontam_report.json")
    report = decontaminate(args.input, args.output, args.against, args.n, args.text_field, report_path)
    print(
        f"kept {report['kept']} documents, dropped {report['dropped']} sharing a {args.n}-gram with an "
        f"evaluation item; report: {report_path}"
    )


def cmd_tokenizer_extend(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from align.core.records import iter_documents
    from base_model import QwenTokenizer
    from base_model.pretrain.vocab import SAMPLES, bytes_per_token, extend_ranks
    from base_model.tokenizer import save_ranks

    base = QwenTokenizer.load(args.base)
    texts = (t for _, _, t in iter_documents(args.corpus, args.text_field))
    with tqdm(desc="merges", total=args.vocab_size, initial=len(base.ranks)) as bar:
        ranks = extend_ranks(
            base.ranks, texts, args.vocab_size, args.min_frequency, progress=lambda n: bar.update(n - bar.n)
        )
    save_ranks(ranks, args.output)
    extended = QwenTokenizer(ranks)
    print(f"wrote {len(ranks)} ranks ({len(ranks) - len(base.ranks)} new) to {args.output}")
    print(f"{'sample':<10}{'bytes/token ' + str(args.base):>28}{'bytes/token extended':>24}")
    for name, text in SAMPLES.items():
        print(f"{name:<10}{bytes_per_token(base.encode, text):>28.3f}{bytes_per_token(extended.encode, text):>24.3f}")


def _rows(path) -> list[tuple[str, dict]]:
    from align.core.records import iter_records

    return list(iter_records(path))


def cmd_tags_raw(args: argparse.Namespace) -> None:
    import json

    from tqdm import tqdm

    from rm.tags.raw import checkpoint_asker, endpoint_asker, raw_tags

    ask_one = endpoint_asker(args.endpoint, args.endpoint_model) if args.endpoint else None
    ask_batch = checkpoint_asker(str(args.model)) if args.model else None
    with tqdm(desc="tags raw", unit="prompt") as bar:
        report = raw_tags(str(args.input), args.out, ask_one, ask_batch, args.offline, args.retries, args.batch_size,
                          progress=bar.update)  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}))
    print(f"{report['tagged']} of {report['prompts']} prompts tagged ({report['distinct_tags']} distinct tags), "
          f"{report['failed']} failed; {args.out} and {args.out}.report.json")  # fmt: skip


def cmd_tags_build(args: argparse.Namespace) -> None:
    from rm.tags.builder import build_folder

    rows = _rows(args.input)
    raw = [[str(t) for t in (r.get(args.tags_field) or [])] for _, r in rows]
    hierarchy = None
    if args.hierarchy or args.safety:
        from rm.tags.hierarchy import llm_namer
        from rm.tags.taxonomy import Taxonomy

        hierarchy = {"safety": Taxonomy.load(args.safety) if args.safety else None,
                     "safety_threshold": args.safety_threshold, "category_distance": args.category_distance,
                     "domain_distance": args.domain_distance,
                     "namer": llm_namer(args.name_endpoint, args.endpoint_model) if args.name_endpoint else None}  # fmt: skip
    report = build_folder(raw, args.out, hierarchy, args.embed_cache or args.out / "embeddings.sqlite",
                          log=lambda m: print(f"[tags build] {m}", flush=True), alpha=args.alpha, eps=args.eps,
                          min_confidence=args.min_confidence, min_support=args.min_support)  # fmt: skip
    print(
        f"{report['raw_kept']} raw tags (after dropping {report['raw_dropped']} seen fewer than {args.alpha} times) "
        f"-> {report['tags']} tags; {report['merges']} merges in {args.out / 'merges.jsonl'}"
        + (
            f"; hierarchy of {report['nodes']} nodes, placements in {args.out / 'placements.jsonl'}"
            if hierarchy
            else ""
        )
        + f"; {report['seconds']:.1f} s"
    )


def cmd_tags_assign(args: argparse.Namespace) -> None:
    import json

    from base_model.atomic import write_rows_atomic
    from rm.tags.tagger import assign
    from rm.tags.taxonomy import Taxonomy

    rows, report = assign(
        _rows(args.input),
        Taxonomy.load(args.taxonomy),
        args.method,
        args.threshold,
        args.top_k,
        args.endpoint,
        args.model,
        args.on_unknown,
    )
    write_rows_atomic(args.output, rows)
    print(json.dumps(report, ensure_ascii=False))


def cmd_tags_sample(args: argparse.Namespace) -> None:
    from align.core.records import DataError
    from base_model.atomic import write_rows_atomic
    from rm.tags.sampler import max_min_ratio, sample, tag_matrix

    rows = _rows(args.input)
    for where, r in rows:
        if not isinstance(r.get(args.tags_field), list):
            raise DataError(f"{where}: field '{args.tags_field}' must be a list of tags")
    m, _ = tag_matrix([r[args.tags_field] for _, r in rows])
    chosen = sample(m, args.n, args.method, args.seed, args.cap, args.temperature)
    write_rows_atomic(args.output, [rows[i][1] for i in chosen])
    print(
        f"sampled {len(chosen)} of {len(rows)} rows ({args.method}); max/min tag frequency "
        f"{max_min_ratio(m, chosen):.1f} (whole input: {max_min_ratio(m, list(range(len(rows)))):.1f})"
    )


def cmd_tags_audit(args: argparse.Namespace) -> None:
    from rm.tags.audit import audit, compare
    from rm.tags.taxonomy import Taxonomy

    if args.compare or args.compare_taxonomy:
        result = compare(args.dataset, args.compare, args.out, Taxonomy.load(args.taxonomy) if args.taxonomy else None,
                         Taxonomy.load(args.compare_taxonomy) if args.compare_taxonomy else None, args.k)  # fmt: skip
        for f in result["figures"]:
            print(f"{f['figure']:<36} {f['before']!s:>12} {f['after']!s:>12}  {f['change']}")
        print(f"report: {args.out / 'comparison.html'}")
        return

    result = audit(
        args.dataset, args.out, args.against, Taxonomy.load(args.taxonomy) if args.taxonomy else None, args.k
    )
    f = result["figures"]
    print(
        f"coverage {f['coverage']:.3f}, entropy {f['entropy']:.3f}, Gini {f['gini']:.3f}, "
        f"{f['tags_under_k']} tags under {args.k} examples; report: {args.out / 'report.html'}"
    )


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from align.inspect_data import format_report, inspect_file
    from base_model import QwenTokenizer
    from base_model.atomic import write_json_atomic

    tokenizer = QwenTokenizer.load(args.tokenizer)
    reports = [inspect_file(str(path), tokenizer, args.max_len, args.samples) for path in args.files]
    print("\n\n".join(format_report(r) for r in reports))
    if args.json:
        write_json_atomic(args.json, [r.as_dict() for r in reports])


def cmd_data_convert(args: argparse.Namespace) -> None:
    from base_model.atomic import write_rows_atomic
    from rm.data import load_comparisons

    records = []
    for path in args.files:
        converted, report = load_comparisons(str(path), on_error=args.on_error)
        records += converted
        layouts = ", ".join(f"{n} {layout}" for layout, n in report.layouts.most_common())
        left_out = "".join(f"; left out {n} ({reason})" for reason, n in report.skipped.most_common())
        layouts = f" ({layouts})" if layouts else ""
        print(f"{path}: {report.records} records{layouts} -> {len(converted)} comparison records{left_out}")
        for example in report.examples[:3]:
            print(f"  {example}")
    write_rows_atomic(args.out, records)
    print(f"wrote {len(records)} comparison records to {args.out}")


def _add_data_commands(data_sub) -> None:
    q = data_sub.add_parser(
        "convert", help="preference data in any layout the readers take -> comparison records (JSONL or Parquet)"
    )
    q.add_argument("files", nargs="+", type=Path, help="JSONL/JSON/Parquet or a datasets folder")
    q.add_argument("--out", type=Path, required=True, help="comparison records for label import, tags audit, rm")
    q.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="records that give no comparison")
    q.set_defaults(func=cmd_data_convert)
    q = data_sub.add_parser("inspect", help="layouts, turns, roles, token lengths, what readers leave out, samples")
    q.add_argument("files", nargs="+", type=Path, help="JSONL/JSON/Parquet or a datasets folder")
    q.add_argument("--tokenizer", default="cl100k_base", help="'cl100k_base', 'bytes', a ranks file or checkpoint")
    q.add_argument("--max-len", type=count(1), default=2048, help="as the SFT config's data.max_len")
    q.add_argument("--samples", type=count(0), default=3, help="rendered samples per file")
    q.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    q.set_defaults(func=cmd_data_inspect)
    q = data_sub.add_parser("dedup", help="exact and MinHash-LSH near-duplicate removal")
    q.add_argument("--input", nargs="+", required=True, type=Path)
    q.add_argument(
        "--code", action="store_true", help="source files: shingles of code tokens, comments and layout ignored"
    )
    q.add_argument("--output", required=True, type=Path, help=".jsonl or .parquet")
    q.add_argument(
        "--threshold", type=amount(above=0, maximum=1), default=0.8, help="Jaccard similarity of near duplicates"
    )
    q.add_argument("--text-field", default="text")
    q.add_argument("--num-perm", type=count(2), default=128)
    q.add_argument("--report", type=Path, default=None, help="clusters removed (default: beside the output)")
    q.set_defaults(func=cmd_data_dedup)
    q = data_sub.add_parser("self-instruct", help="instructions and instances generated by the model (Self-Instruct)")
    q.add_argument("--model", type=Path, default=None, help="a checkpoint folder")
    q.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL (its /completions)")
    q.add_argument("--endpoint-model", default="default")
    q.add_argument("--tokenizer", default=None, help="--endpoint: the model's tokenizer")
    q.add_argument("--seed-tasks", type=Path, required=True, help="JSONL: instruction, instances, is_classification")
    q.add_argument("--n", type=count(1), required=True, help="instructions to keep")
    q.add_argument("--out", type=Path, required=True, help="JSONL, appended (resumable); OUT.report.json beside it")
    q.add_argument("--tools", default=None, help="the tool-use variant: e.g. calculator,python")
    q.add_argument("--max-steps", type=count(1), default=6, help="--tools: agent steps per question")
    q.add_argument("--max-rounds", type=count(1), default=None, help="stop after this many generation prompts")
    q.add_argument("--temperature", type=amount(minimum=0), default=0.7)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_data_self_instruct)
    q = data_sub.add_parser(
        "train-classifier", help="a linear quality (or offensive-content) classifier over hashed n-grams"
    )
    q.add_argument("--positive", nargs="+", required=True, type=Path, help="documents of the class to score high")
    q.add_argument("--negative", nargs="+", required=True, type=Path, help="documents of the other class")
    q.add_argument("--out", required=True, type=Path, help="the model (joblib), with OUT.json: held-out figures")
    q.add_argument(
        "--heldout", type=amount(above=0, below=1), default=0.2, help="share of each class held out for the figures"
    )
    q.add_argument("--text-field", default="text")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_data_train_classifier)
    q = data_sub.add_parser("filter", help="Gopher-style rules and reference-model perplexity, or a classifier")
    q.add_argument("--input", nargs="+", required=True, type=Path)
    q.add_argument("--output", required=True, type=Path)
    q.add_argument("--rejected", type=Path, default=None, help="also write dropped documents with their scores")
    q.add_argument("--rules", type=Path, default=None, help="YAML of thresholds (see QualityRules)")
    q.add_argument("--model", type=Path, default=None, help="reference model for perplexity")
    q.add_argument("--banned-words", type=Path, default=None, help="one word or phrase per line")
    q.add_argument("--text-field", default="text")
    q.add_argument("--classifier", type=Path, default=None, help="a model from `align data train-classifier`")
    q.add_argument("--min-score", type=float, default=None, help="--classifier: keep documents scoring at least X")
    q.add_argument("--max-score", type=float, default=None, help="--classifier: keep documents scoring at most X")
    q.add_argument("overrides", nargs="*", help="rule overrides, e.g. min_words=20 max_perplexity=500")
    q.set_defaults(func=cmd_data_filter)
    q = data_sub.add_parser("decontaminate", help="drop documents sharing an n-gram with evaluation items")
    q.add_argument("--input", nargs="+", required=True, type=Path)
    q.add_argument("--output", required=True, type=Path)
    q.add_argument("--against", nargs="+", required=True, type=Path, help="evaluation files (JSONL/Parquet)")
    q.add_argument("--n", type=count(1), default=13)
    q.add_argument("--text-field", default="text")
    q.add_argument("--report", type=Path, default=None)
    q.set_defaults(func=cmd_data_decontaminate)


def register(sub) -> None:
    p = sub.add_parser("data", help="pretraining data: pack | dedup | filter | train-classifier | decontaminate")
    data_sub = p.add_subparsers(
        dest="data_command", metavar="inspect|convert|pack|dedup|filter|train-classifier|decontaminate"
    )
    data_sub.required = True
    q = data_sub.add_parser("pack", help="tokenise and pack documents into fixed-length rows")
    q.add_argument("--input", nargs="+", type=Path, help="JSONL or Parquet files, packed in order")
    q.add_argument(
        "--mix",
        nargs="+",
        metavar="FILE:WEIGHT",
        help="sources mixed by their weight's share of the tokens (instruction rows with 'messages' as ChatML)",
    )
    q.add_argument("--tokens", type=count(1), default=None, help="--mix: total tokens (default: no source repeated)")
    q.add_argument(
        "--decontaminate-against",
        nargs="+",
        type=Path,
        default=None,
        help="--mix: drop documents sharing an n-gram with these benchmark files (HumanEval's .jsonl.gz works)",
    )
    q.add_argument("--ngram", type=count(1), default=13)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--output", required=True, type=Path, help="packed folder")
    q.add_argument("--tokenizer", default="cl100k_base", help="'cl100k_base', 'bytes', a ranks file or checkpoint")
    q.add_argument("--seq-len", type=count(2), default=2048)
    q.add_argument("--text-field", default="text")
    q.set_defaults(func=cmd_data_pack)
    _add_data_commands(data_sub)

    p = sub.add_parser("tokenizer", help="vocabulary tools: extend")
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="extend")
    tok_sub.required = True
    q = tok_sub.add_parser("extend", help="learn extra BPE merges on a corpus, starting from a base vocabulary")
    q.add_argument("--base", default="cl100k_base", help="'cl100k_base', 'bytes' or a ranks file")
    q.add_argument("--corpus", nargs="+", required=True, type=Path, help="JSONL or Parquet with a text field")
    q.add_argument("--vocab-size", type=count(1), required=True, help="number of ranks in the result")
    q.add_argument("--output", type=Path, required=True)
    q.add_argument("--min-frequency", type=count(1), default=2)
    q.add_argument("--text-field", default="text")
    q.set_defaults(func=cmd_tokenizer_extend)

    p = sub.add_parser("tags", help="tag taxonomy: raw | build | assign | sample | audit")
    tags_sub = p.add_subparsers(dest="tags_command", metavar="raw|build|assign|sample|audit")
    tags_sub.required = True
    q = tags_sub.add_parser("raw", help="open-set tags with explanations (InsTag's prompt), or offline keyphrases")
    q.add_argument("--input", required=True, type=Path, help="prompts (prompt, messages, text or instruction)")
    q.add_argument("--out", required=True, type=Path, help="raw_tags.jsonl (appended: resumable) + OUT.report.json")
    q.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL")
    q.add_argument("--endpoint-model", default="default")
    q.add_argument("--model", type=Path, default=None, help="a checkpoint folder (our sampler)")
    q.add_argument("--offline", action="store_true", help="no model: TF-IDF keyphrases of each prompt as its tags")
    q.add_argument("--retries", type=count(0), default=2, help="asks again when an answer has no valid tag")
    q.add_argument("--batch-size", type=count(1), default=16)
    q.set_defaults(func=cmd_tags_raw)
    q = tags_sub.add_parser("build", help="open-set raw tags -> a taxonomy (InsTag's four steps)")
    q.add_argument("--input", type=Path, required=True, help="JSONL/Parquet rows with a list of raw tags")
    q.add_argument("--out", type=Path, required=True, help="folder for taxonomy.yaml, merges.jsonl, mapping.json")
    q.add_argument("--tags-field", default="tags")
    q.add_argument("--alpha", type=count(1), default=20, help="drop raw tags seen fewer times (InsTag: 20)")
    q.add_argument(
        "--eps", type=amount(above=0, maximum=2), default=0.3, help="DBSCAN cosine distance for semantic merges"
    )
    q.add_argument(
        "--min-confidence", type=amount(above=0, maximum=1), default=0.95, help="FP-Growth confidence, both directions"
    )
    q.add_argument("--min-support", type=amount(above=0, maximum=1), default=0.001)
    q.add_argument("--hierarchy", action="store_true", help="cluster the tags into categories and domains")
    q.add_argument("--safety", type=Path, default=None, help="harm categories (taxonomy file) seeding a safety subtree")
    q.add_argument(
        "--safety-threshold",
        type=amount(minimum=-1, maximum=1),
        default=0.5,
        help="cosine similarity to a harm category",
    )
    q.add_argument(
        "--category-distance", type=amount(above=0, maximum=2), default=0.75, help="cosine distance within a category"
    )
    q.add_argument(
        "--domain-distance", type=amount(above=0, maximum=2), default=0.85, help="cosine distance within a domain"
    )
    q.add_argument("--name-endpoint", default=None, help="name categories and domains with an LLM at this base URL")
    q.add_argument("--endpoint-model", default="default")
    q.add_argument(
        "--embed-cache", type=Path, default=None, help="embeddings kept here (default OUT/embeddings.sqlite)"
    )
    q.set_defaults(func=cmd_tags_build)
    q = tags_sub.add_parser("assign", help="tag rows onto a taxonomy")
    q.add_argument("--input", type=Path, required=True)
    q.add_argument("--output", type=Path, required=True)
    q.add_argument("--taxonomy", type=Path, required=True)
    q.add_argument("--method", choices=["data", "embedding", "llm"], default="data")
    q.add_argument(
        "--threshold", type=amount(minimum=-1, maximum=1), default=0.35, help="minimum cosine similarity (embedding)"
    )
    q.add_argument("--top-k", type=count(1), default=3)
    q.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL for --method llm")
    q.add_argument("--model", default="default", help="model name sent to the endpoint")
    q.add_argument("--on-unknown", choices=["error", "drop"], default="error", help="data tags not in the taxonomy")
    q.set_defaults(func=cmd_tags_assign)
    q = tags_sub.add_parser("sample", help="tag-balanced sampling; output rows are input rows, unchanged")
    q.add_argument("--input", type=Path, required=True)
    q.add_argument("--output", type=Path, required=True)
    q.add_argument("--n", type=count(1), required=True)
    q.add_argument("--method", choices=["complexity-first", "capped", "temperature"], default="complexity-first")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--cap", type=count(1), default=None, help="per-tag cap (capped; default: water-filling)")
    q.add_argument("--temperature", type=amount(above=0), default=2.0, help="T5-style temperature (temperature)")
    q.add_argument("--tags-field", default="tags")
    q.set_defaults(func=cmd_tags_sample)
    q = tags_sub.add_parser("audit", help="what a sample contains: coverage, balance, safety, labels")
    q.add_argument("dataset", type=Path)
    q.add_argument("--against", type=Path, default=None, help="the original pool the sample came from")
    q.add_argument("--taxonomy", type=Path, default=None)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--k", type=count(1), default=5, help="flag tags with fewer examples")
    q.add_argument("--compare", type=Path, default=None, help="another sample: figures before and after, per tag")
    q.add_argument(
        "--compare-taxonomy", type=Path, default=None, help="the same sample read in another taxonomy version"
    )
    q.set_defaults(func=cmd_tags_audit)
