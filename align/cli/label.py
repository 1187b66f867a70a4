"""`align label`: argument parsing only; each handler calls one library function and prints its result."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.cli.numbers import amount, count
from align.core.config import ConfigError


def _password() -> str:
    import getpass

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
    if not password:
        raise ConfigError("an empty password is not allowed (give it on stdin)")
    return password


def cmd_label_users(args: argparse.Namespace) -> None:
    """users add | remove | set-role | passwd | disable | enable | list: each change ends the user's sessions."""
    from labeling_ui.auth import hash_password
    from labeling_ui.store import Conflict, Store

    store = Store(args.db)
    action = args.users_command
    try:
        if action == "list":
            for u in store.users():
                print(f"{u['id']:>5}  {u['name']:<30} {u['role']:<10} {'disabled' if u['disabled'] else ''}")
            return
        if action == "add":
            store.add_user(args.name, args.role, hash_password(_password()))
            print(f"added {args.role} {args.name}")
        elif action == "remove":
            store.remove_user(args.name)
            print(f"removed {args.name} (sessions ended; their annotations stay in exports)")
        elif action == "set-role":
            store.set_role(args.name, args.role)
            print(f"{args.name} is now {args.role} (sessions ended)")
        elif action == "passwd":
            store.set_password(args.name, hash_password(_password()))
            print(f"password of {args.name} changed (sessions ended)")
        else:
            store.set_disabled(args.name, action == "disable")
            print(f"{args.name} {action}d")
    except (Conflict, KeyError, ValueError) as e:
        raise ConfigError(str(e.args[0]) if e.args else str(e)) from None


def cmd_label_members(args: argparse.Namespace) -> None:
    """members add PROJECT NAME... | remove PROJECT NAME | list PROJECT."""
    from labeling_ui.store import Store

    store = Store(args.db)
    try:
        if args.members_command == "add":
            store.add_members(args.project, args.names)
            print(f"{', '.join(args.names)} added to {args.project}")
        elif args.members_command == "remove":
            store.remove_member(args.project, args.name)
            print(f"{args.name} removed from {args.project}")
        else:
            print("\n".join(store.members(args.project)))
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e.args[0]) if e.args else str(e)) from None


def cmd_label_audit(args: argparse.Namespace) -> None:
    from align.core.records import write_jsonl_atomic
    from labeling_ui.store import Store

    rows = Store(args.db).audit_log()
    write_jsonl_atomic(args.out, rows)
    print(f"wrote {len(rows)} audit entries to {args.out}")


def cmd_label_import(args: argparse.Namespace) -> None:
    from labeling_ui.api import read_task_file
    from labeling_ui.store import Store
    from rm.tags.taxonomy import Taxonomy

    known = set(Taxonomy.load(args.taxonomy).tags) if args.taxonomy else None
    items = read_task_file(args.file, known)
    guidelines = args.guidelines.read_text(encoding="utf-8") if args.guidelines else None
    from tqdm import tqdm

    store = Store(args.db)
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    if members:  # before the import: a wrong name stops here, with nothing imported
        try:
            store.add_members(args.project, members)
        except (KeyError, ValueError) as e:
            raise ConfigError(str(e.args[0])) from None
    with tqdm(total=len(items), desc="import", unit="task", disable=len(items) < 5000) as bar:
        n = store.import_tasks(
            args.project, items, args.overlap, guidelines, progress=lambda done, _: bar.update(done - bar.n)
        )
    print(f"imported {n} tasks into {args.project} (overlap {args.overlap})")
    if members:
        print(f"members of {args.project}: {', '.join(members)}")


def cmd_label_export(args: argparse.Namespace) -> None:
    from align.core.records import write_jsonl_atomic
    from labeling_ui.api import readable
    from labeling_ui.export import comparison_record
    from labeling_ui.store import Store

    try:
        annotations = Store(args.db).annotations(args.project)
    except KeyError as e:
        raise ConfigError(f"{e.args[0]} in {args.db}") from None
    rows, bad = readable(annotations)
    for line in bad:
        print(f"left out: {line}", file=sys.stderr)
    records = [r for t, anns in rows if (r := comparison_record(t, anns, args.rule)) is not None]
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
    uvicorn.run(create_server(Store(db, session_hours=args.session_hours), known), host=args.host, port=args.port)


def cmd_label_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from labeling_ui.candidates import generate_candidates

    with tqdm(desc="generate", unit="prompt") as bar:
        n = generate_candidates(
            args.model, args.prompts, args.out, args.k, args.max_new_tokens, args.seed, progress=bar.update
        )
    print(
        f"wrote {n} tasks with {args.k} candidate responses each to {args.out} "
        f"(import them with `align label import --file {args.out}`)"
    )


def cmd_label_taxonomy(args: argparse.Namespace) -> None:
    """taxonomy import | export | list: taxonomies under review in the app's Taxonomy tab."""
    from labeling_ui.store import Store
    from labeling_ui.taxonomies import import_build

    store = Store(args.db)
    if args.taxonomy_command == "list":
        for t in store.taxonomies():
            print(f"{t['name']}  version {t['version']}")
    elif args.taxonomy_command == "import":
        import_build(store, args.name, args.build, args.prompts, args.tags_field)
        _, tax = store.taxonomy_version(args.name)
        print(f"imported taxonomy {args.name!r} ({len(tax)} tags) at version 1; reviewers edit it in the Taxonomy tab")
    else:
        from base_model.atomic import write_text_atomic

        try:
            text = store.export_taxonomy(args.name, args.version)
        except KeyError as e:
            raise ConfigError(f"{e.args[0]} in {args.db}") from None
        write_text_atomic(args.out, text)
        store.audit("cli", "taxonomy_export", taxonomy=args.name, version=args.version)
        print(
            f"wrote {args.out} ({text.splitlines()[0].lstrip('# ')}); `align tags assign --taxonomy {args.out}` reads it"
        )


def register(sub) -> None:
    p = sub.add_parser(
        "label",
        help="labelling: serve (web page + REST API) | users | members | audit | import | generate | export | taxonomy",
    )
    label_sub = p.add_subparsers(
        dest="label_command", metavar="serve|users|members|audit|import|generate|export|taxonomy"
    )
    label_sub.required = True
    q = label_sub.add_parser("serve", help="serve the web page (/) and the JSON REST API (/api)")
    q.add_argument("--db", default="sqlite:///labels.db", help="SQLAlchemy URL (sqlite:///… or postgresql://…)")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=count(0, 65535), default=7860)
    q.add_argument("--taxonomy", type=Path, default=None, help="taxonomy YAML: tags offered and checked on import")
    q.add_argument(
        "--session-hours", type=amount(above=0), default=12.0, help="life of a login (API token or page session)"
    )
    q.add_argument(
        "--demo",
        type=Path,
        nargs="?",
        const=Path("align-demo"),
        default=None,
        help="serve the labelling data of an `align demo` run (default folder align-demo)",
    )
    q.set_defaults(func=cmd_label_serve)
    q = label_sub.add_parser("generate", help="K candidate responses per prompt from a checkpoint, as tasks JSONL")
    q.add_argument("--model", type=Path, required=True, help="checkpoint folder (align init-model / sft output)")
    q.add_argument("--prompts", type=Path, required=True, help="JSONL with 'prompt' (text or messages), 'tags'")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--k", type=count(2, 6), default=4, help="responses per prompt, each with its own sampling setting")
    q.add_argument("--max-new-tokens", type=count(1), default=64)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_label_generate)
    q = label_sub.add_parser(
        "users", help="accounts: add | remove | set-role | passwd | disable | enable | list (passwords on stdin)"
    )
    users_sub = q.add_subparsers(dest="users_command", metavar="add|remove|set-role|passwd|disable|enable|list")
    users_sub.required = True
    for name, help_ in (
        ("add", "a new account: add NAME --role ROLE (password on stdin)"),
        ("remove", "remove an account (its sessions end; its id is never reused)"),
        ("set-role", "set-role NAME ROLE"),
        ("passwd", "a new password (on stdin)"),
        ("disable", "refuse the account's logins and end its sessions"),
        ("enable", "allow a disabled account again"),
        ("list", "the accounts"),
    ):
        r = users_sub.add_parser(name, help=help_)
        if name != "list":
            r.add_argument("name")
        if name == "add":
            r.add_argument("--role", choices=["annotator", "reviewer", "admin"], required=True)
        if name == "set-role":
            r.add_argument("role", choices=["annotator", "reviewer", "admin"])
        r.add_argument("--db", default="sqlite:///labels.db")
        r.set_defaults(func=cmd_label_users)
    q = label_sub.add_parser("members", help="who works on a project: add PROJECT NAME... | remove | list")
    members_sub = q.add_subparsers(dest="members_command", metavar="add|remove|list")
    members_sub.required = True
    r = members_sub.add_parser("add", help="annotators see, reviewers review, only the projects they are members of")
    r.add_argument("project")
    r.add_argument("names", nargs="+")
    r = members_sub.add_parser("remove")
    r.add_argument("project")
    r.add_argument("name")
    r = members_sub.add_parser("list")
    r.add_argument("project")
    for r in members_sub.choices.values():
        r.add_argument("--db", default="sqlite:///labels.db")
        r.set_defaults(func=cmd_label_members)
    q = label_sub.add_parser("audit", help="the audit log (logins, imports, exports, account changes) as JSONL")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--db", default="sqlite:///labels.db")
    q.set_defaults(func=cmd_label_audit)
    q = label_sub.add_parser("import", help="import tasks (JSONL: prompt, responses, tags); all or nothing")
    q.add_argument("--project", required=True)
    q.add_argument("--file", type=Path, required=True)
    q.add_argument("--overlap", type=count(1), default=1, help="distinct annotators per item")
    q.add_argument("--guidelines", type=Path, default=None, help="Markdown shown beside every task")
    q.add_argument("--taxonomy", type=Path, default=None, help="refuse tags that are not in this taxonomy")
    q.add_argument("--members", default="", help="comma-separated users to add to the project (see `members`)")
    q.add_argument("--db", default="sqlite:///labels.db")
    q.set_defaults(func=cmd_label_import)
    q = label_sub.add_parser("taxonomy", help="taxonomies under review: import | export | list")
    tax_sub = q.add_subparsers(dest="taxonomy_command", metavar="import|export|list")
    tax_sub.required = True
    r = tax_sub.add_parser("import", help="an `align tags build` folder, reviewed in the Taxonomy tab")
    r.add_argument("--name", required=True)
    r.add_argument("--build", type=Path, required=True, help="the build folder (taxonomy.yaml, merges.jsonl, …)")
    r.add_argument("--prompts", type=Path, default=None, help="the raw-tag rows it was built from (example prompts)")
    r.add_argument("--tags-field", default="tags")
    r = tax_sub.add_parser("export", help="a version as a taxonomy file (`tags assign`, `tags audit` read it)")
    r.add_argument("--name", required=True)
    r.add_argument("--version", type=count(1), default=None, help="default: the latest")
    r.add_argument("--out", type=Path, required=True)
    r = tax_sub.add_parser("list")
    for r in tax_sub.choices.values():
        r.add_argument("--db", default="sqlite:///labels.db")
        r.set_defaults(func=cmd_label_taxonomy)
    q = label_sub.add_parser("export", help="comparison records for `align rm train`")
    q.add_argument("--project", required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--rule", choices=["majority", "ranked_pairs"], default="majority")
    q.add_argument("--db", default="sqlite:///labels.db")
    q.set_defaults(func=cmd_label_export)
