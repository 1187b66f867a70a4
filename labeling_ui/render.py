"""Conversations and responses as HTML: Markdown with raw HTML escaped (a `<script>` is shown, never run) and code
blocks highlighted by Pygments."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.util import ClassNotFound

from align.core.records import as_messages

CSS = (
    HtmlFormatter(style="friendly").get_style_defs("pre code")
    + """
.chat { display: flex; flex-direction: column; gap: 8px; }
.turn { padding: 8px 12px; border-radius: 8px; max-width: 90%; }
.turn.user { background: #e8f0fe; align-self: flex-end; }
.turn.assistant { background: #f1f3f4; align-self: flex-start; }
.turn.system { background: #fff8e1; font-size: 0.9em; }
.turn .who { font-size: 0.75em; color: #555; text-transform: uppercase; }
.responses { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 10px; }
.response { border: 1px solid #ccc; border-radius: 8px; padding: 8px 12px; }
.response h4 { margin: 0 0 6px 0; }
.progress-wrap { font-size: 0.9em; }
.progress-wrap progress { width: 100%; height: 12px; }
"""
)


def _highlight(code: str, lang: str, _attrs) -> str:
    try:
        lexer = get_lexer_by_name(lang) if lang else TextLexer()
    except ClassNotFound:
        lexer = TextLexer()
    return highlight(code, lexer, HtmlFormatter(nowrap=True))  # markdown-it wraps it in <pre><code>


_md = MarkdownIt("commonmark", {"html": False, "highlight": _highlight}).enable("table")


def markdown(text: str) -> str:
    """Markdown to HTML; raw HTML in the text comes out escaped (html=False)."""
    return _md.render(text)


def conversation(prompt: list[dict] | str) -> str:
    messages = as_messages(prompt, "task", check=False) if prompt else []  # nothing on screen: an empty conversation
    turns = "".join(
        f'<div class="turn {html.escape(m.get("role", "user"))}"><div class="who">'
        f"{html.escape(m.get('role', 'user'))}</div>{markdown(m.get('content', ''))}</div>"
        for m in messages
    )
    return f'<div class="chat" id="chat">{turns}</div>'


def responses(texts: list[str]) -> str:
    cards = "".join(
        f'<div class="response" data-index="{i}"><h4>Response {i + 1}</h4>{markdown(t)}</div>'
        for i, t in enumerate(texts)
    )
    return f'<div class="responses">{cards}</div>'


def progress(p: dict[str, int]) -> str:
    mine_total = p["mine_done"] + p["mine_remaining"]
    return (
        f'<div class="progress-wrap">You: {p["mine_done"]} done, {p["mine_remaining"]} remaining '
        f'<progress max="{max(mine_total, 1)}" value="{p["mine_done"]}"></progress>'
        f"Project: {p['project_done']} / {p['project_total']} annotations "
        f'<progress max="{max(p["project_total"], 1)}" value="{p["project_done"]}"></progress></div>'
    )
