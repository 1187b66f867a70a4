"""The web page (Gradio, mounted on the FastAPI app): annotators rank responses, reviewers audit agreement and
review taxonomies (`taxonomy_web.py`).

Login is Gradio's form checked against the store's scrypt hashes; every handler looks the user up again and checks
the role, so hiding the reviewer tab is a convenience, not the protection. Keyboard: number keys give the next
response its rank (1 = best, repeat a number for a tie), Backspace removes the last, Enter submits, S skips, U undoes.
"""

from __future__ import annotations

import time

import gradio as gr
from fastapi import FastAPI

from labeling_ui import render, taxonomy_web
from labeling_ui.agreement import project_report
from labeling_ui.api import create_app, readable
from labeling_ui.auth import LoginThrottle, check_login
from labeling_ui.store import Conflict, Store
from labeling_ui.validate import UNSAFE_CATEGORIES, annotation_problems, text_problem

KEYS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target, tag = (t.tagName || '').toLowerCase();
  if (tag === 'textarea' || (tag === 'input' && !['checkbox', 'range', 'radio'].includes(t.type))) return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const box = document.querySelector('#ranks textarea, #ranks input');
  if (!box) return;
  const set = (v) => { box.value = v; box.dispatchEvent(new Event('input', {bubbles: true})); };
  const parts = box.value.trim() ? box.value.trim().split(/[\\s,]+/) : [];
  if (/^[1-9]$/.test(e.key)) { parts.push(e.key); set(parts.join(' ')); e.preventDefault(); }
  else if (e.key === 'Backspace') { parts.pop(); set(parts.join(' ')); e.preventDefault(); }
  else if (e.key === 'Enter') { document.querySelector('#submit').click(); e.preventDefault(); }
  else if (e.key === 's' || e.key === 'S') { document.querySelector('#skip').click(); e.preventDefault(); }
  else if (e.key === 'u' || e.key === 'U') { document.querySelector('#undo').click(); e.preventDefault(); }
});
</script>
"""

HELP = (
    "**Keys:** number keys rank the responses in order (1 = best; the same number twice is a tie), "
    "Backspace removes the last, **Enter** submits, **S** skips, **U** undoes your last submission. "
    "A skip is yours alone: you will not see that item again, and it goes to someone else (it does not use up "
    "one of the item's annotations)."
)


def parse_ranks(text: str, k: int) -> list[int]:
    """'1 3 2' or '1,3,2' -> [1, 3, 2]; a clear message when it is not one rank >= 1 per response."""
    parts = text.replace(",", " ").split()
    if len(parts) != k or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"give {k} ranks, one per response (1 = best, equal numbers for a tie); got {text!r}")
    return [int(p) for p in parts]


def build_ui(store: Store, tags: list[str] | None = None, logged_in_at: dict[str, float] | None = None) -> gr.Blocks:
    """`logged_in_at` (user name -> monotonic time of the page login) makes a page session end after the store's
    session life, as an API token does."""
    known = set(tags) if tags else None
    life = store.session_life.total_seconds()

    def user_of(request: gr.Request, *roles: str):
        user = store.user_by_name(request.username) if request and request.username else None
        if user is None or user.disabled:
            raise gr.Error("please log in again")
        if logged_in_at is not None and time.monotonic() - logged_in_at.get(user.name, float("-inf")) > life:
            raise gr.Error("your session has expired: log out (/logout) and log in again")
        if roles and user.role not in roles:
            raise gr.Error(f"this needs the role {' or '.join(roles)}")
        return user

    def show(project: str, request: gr.Request, note: str = ""):
        """Lease the next task (or keep the held one) and fill the page."""
        user = user_of(request)
        if project and not store.may_see(project, user):
            raise gr.Error(f"you are not a member of project {project!r}")
        task = store.next_task(project, user.id) if project else None
        progress = render.progress(store.progress(project, user.id)) if project else ""
        if task is None:
            done = "Nothing left to annotate in this project. Thank you!" if project else "Choose a project."
            return (
                None,
                render.conversation([]),
                "",
                progress,
                gr.update(value=""),
                gr.update(visible=False),
                gr.update(value=[]),
                f"{note} {done}".strip(),
            )
        k = len(task.responses)
        return (
            task.id,
            render.conversation(task.prompt),
            render.responses(task.responses),
            progress,
            gr.update(value="", label=f"Ranking of the {k} responses (e.g. {' '.join(map(str, range(1, k + 1)))})"),
            gr.update(visible=k == 2, value=0.5),
            gr.update(value=list(task.tags or [])),
            f"{note} Task {task.id}: {k} responses.".strip(),
        )

    def submit(project, task_id, ranks_text, strength, all_bad, unsafe, chosen_tags, rationale, request: gr.Request):
        user = user_of(request)
        if task_id is None:
            raise gr.Error("no task on screen")
        task = store.task(task_id)
        if task is None:
            raise gr.Error(f"task {task_id} no longer exists")
        k = len(task.responses)
        try:
            ranks = parse_ranks(ranks_text or "", k)
            store.submit(
                task_id,
                user.id,
                ranks=ranks,
                skipped=False,
                all_bad=bool(all_bad),
                unsafe=unsafe or None,
                tags=list(chosen_tags or []),
                rationale=rationale or "",
                strength=float(strength) if k == 2 else None,
                check=lambda t: _check(t, ranks, float(strength) if k == 2 else None, unsafe, chosen_tags, rationale),
            )
        except (ValueError, Conflict) as e:
            raise gr.Error(str(e)) from None
        return (*show(project, request, f"Saved task {task_id}: {' '.join(map(str, ranks))}."), False, "", "")

    def _check(task, ranks, strength, unsafe, chosen_tags, rationale) -> None:
        problems = annotation_problems(
            len(task.responses), ranks, strength, unsafe or None, list(chosen_tags or []), rationale or "", known
        )
        if problems:
            raise ValueError("; ".join(problems))

    def skip(project, task_id, request: gr.Request):
        user = user_of(request)
        if task_id is not None:
            try:
                store.submit(task_id, user.id, ranks=None, skipped=True)
            except Conflict as e:
                raise gr.Error(str(e)) from None
        return (*show(project, request, f"Skipped task {task_id}."), False, "", "")

    def undo(project, request: gr.Request):
        user = user_of(request)
        task_id = store.undo_last(project, user.id)
        return (*show(project, request, f"Undid task {task_id}." if task_id else "Nothing to undo."), False, "", "")

    def on_load(request: gr.Request):
        user = user_of(request)
        projects = store.projects(user)
        project = projects[0] if projects else None
        is_reviewer = user.role in ("reviewer", "admin")
        taxonomies = [t["name"] for t in store.taxonomies()] if is_reviewer else []
        return (
            gr.update(choices=projects, value=project),
            f"Logged in as **{user.name}** ({user.role})",
            gr.update(visible=is_reviewer),
            gr.update(choices=projects, value=project),
            render.markdown(store.guidelines(project)) if project else "",
            gr.update(visible=is_reviewer),
            gr.update(choices=taxonomies, value=taxonomies[0] if taxonomies else None),
        )

    def review(project, request: gr.Request):
        user = user_of(request, "reviewer", "admin")
        if not project:
            raise gr.Error("choose a project")
        if not store.may_see(project, user):
            raise gr.Error(f"you are not a member of project {project!r}")
        report = project_report(readable(store.annotations(project))[0])
        o = report["overall"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        summary = (
            f"**{o['items']}** ranked items, **{o['items_multi']}** with two or more annotators. "
            f"Kendall's W {fmt(o['kendall_w'])} · pairwise agreement {fmt(o['pairwise'])} · "
            f"Krippendorff's α (ordinal) {fmt(o['krippendorff_alpha'])}"
        )
        per_tag = [
            [t, a["items"], a["items_multi"], a["kendall_w"], a["pairwise"], a["krippendorff_alpha"]]
            for t, a in report["per_tag"].items()
        ]
        people = [
            [a["annotator"], a["annotations"], a["skip_rate"], a["median_seconds"], a["agreement_with_majority"]]
            for a in report["annotators"]
        ]
        flagged = [
            [f["task"], f["annotator"], f["unsafe"], f["all_bad"], f["rationale"], f["prompt"]]
            for f in report["flagged"]
        ]
        counts = {t: a["items"] for t, a in report["per_tag"].items()}
        total = sum(counts.values()) or 1
        audit = [[t, n, n / total] for t, n in sorted(counts.items(), key=lambda x: -x[1])]
        return summary, per_tag, people, flagged, audit

    with gr.Blocks(title="Ranking responses") as ui:
        task_id = gr.State(None)
        with gr.Row():
            who = gr.Markdown(elem_id="who")
            project = gr.Dropdown(label="Project", choices=[], elem_id="project", scale=1)
        with gr.Tab("Annotate"):
            progress = gr.HTML(elem_id="progress")
            with gr.Row():
                with gr.Column(scale=3):
                    chat = gr.HTML(elem_id="conversation")
                    responses = gr.HTML(elem_id="responses")
                    ranks = gr.Textbox(label="Ranking", elem_id="ranks", placeholder="press number keys: 1 3 2")
                    strength = gr.Slider(
                        0,
                        1,
                        value=0.5,
                        step=0.25,
                        visible=False,
                        elem_id="strength",
                        label="Strength of preference (0.25 slight … 1 decisive)",
                    )
                    with gr.Row():
                        all_bad = gr.Checkbox(label="All responses are bad", elem_id="all-bad")
                        unsafe = gr.Dropdown(
                            ["", *UNSAFE_CATEGORIES], value="", label="Flag as unsafe (category)", elem_id="unsafe"
                        )
                    chosen_tags = gr.Dropdown(
                        tags or [],
                        multiselect=True,
                        filterable=True,
                        label="Tags",
                        elem_id="tags",
                        allow_custom_value=not tags,
                    )
                    rationale = gr.Textbox(label="Rationale (optional)", lines=2, elem_id="rationale")
                    with gr.Row():
                        submit_btn = gr.Button("Submit (Enter)", variant="primary", elem_id="submit")
                        skip_btn = gr.Button("Skip (S)", elem_id="skip")
                        undo_btn = gr.Button("Undo last (U)", elem_id="undo")
                    status = gr.Markdown(elem_id="status")
                    gr.Markdown(HELP)
                with gr.Column(scale=1):
                    gr.Markdown("### Guidelines")
                    guidelines = gr.HTML(elem_id="guidelines")
        with gr.Tab("Review", visible=False) as review_tab:
            review_project = gr.Dropdown(label="Project", choices=[], elem_id="review-project")
            refresh = gr.Button("Compute agreement", elem_id="refresh")
            summary = gr.Markdown(elem_id="agreement")
            gr.Markdown("#### Agreement per tag")
            per_tag = gr.Dataframe(
                headers=["tag", "items", "items ≥2 annotators", "Kendall W", "pairwise", "Krippendorff α"],
                elem_id="per-tag",
            )
            gr.Markdown("#### Annotators")
            people = gr.Dataframe(
                headers=["annotator", "annotations", "skip rate", "median seconds", "agreement with majority"],
                elem_id="annotators",
            )
            gr.Markdown("#### Flagged items (unsafe or all bad)")
            flagged = gr.Dataframe(
                headers=["task", "annotator", "unsafe", "all bad", "rationale", "prompt"], elem_id="flagged"
            )
            gr.Markdown("#### Tag balance of the labelled items")
            audit = gr.Dataframe(headers=["tag", "items", "share"], elem_id="audit")
        with gr.Tab("Taxonomy", visible=False) as taxonomy_tab:
            taxonomy_name = taxonomy_web.build(store, user_of)

        page = [task_id, chat, responses, progress, ranks, strength, chosen_tags, status]
        cleared = [all_bad, unsafe, rationale]
        ui.load(
            on_load, None, [project, who, review_tab, review_project, guidelines, taxonomy_tab, taxonomy_name]
        ).then(show, [project], page)
        project.change(show, [project], page).then(
            lambda p: render.markdown(store.guidelines(p)) if p else "", [project], [guidelines]
        )
        submit_btn.click(
            submit, [project, task_id, ranks, strength, all_bad, unsafe, chosen_tags, rationale], page + cleared
        )
        skip_btn.click(skip, [project, task_id], page + cleared)
        undo_btn.click(undo, [project], page + cleared)
        refresh.click(review, [review_project], [summary, per_tag, people, flagged, audit])
    return ui


def create_server(store: Store, known_tags: set[str] | None = None) -> FastAPI:
    """The REST API under /api and the web page at /, in one FastAPI app."""
    throttle = LoginThrottle()
    app = create_app(store, known_tags, throttle)
    logged_in_at: dict[str, float] = {}

    def check(username: str, password: str) -> bool:
        """The page's login: the API's rules (constant work, back-off per user name, audit); a disabled or removed
        user's open page is refused at its next action (`user_of`)."""
        if text_problem(username, "username", 200) or throttle.retry_after(f"user:{username}") > 0:
            return False
        user = store.user_by_name(username)
        ok = check_login(password, user.password_hash if user is not None else None) and not user.disabled
        if ok:
            throttle.succeeded(f"user:{username}")
            logged_in_at[username] = time.monotonic()
        else:
            throttle.failed(f"user:{username}")
        store.audit(username[:200], "login" if ok else "login_failed", via="page")
        return ok

    ui = build_ui(store, sorted(known_tags) if known_tags else None, logged_in_at)
    return gr.mount_gradio_app(
        app,
        ui,
        path="/",
        auth=check,
        auth_message="Log in to rank responses.",
        head=KEYS_JS,
        css=render.CSS,
        ssr_mode=False,
        footer_links=[],
    )
