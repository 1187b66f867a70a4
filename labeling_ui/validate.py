"""What the labelling app accepts, checked the same way on SQLite and PostgreSQL: every problem is a ValueError
(the API's 422) naming the field, never a database error. Limits are module constants a deployment can change."""

from __future__ import annotations

import math
import re

UNSAFE_CATEGORIES = (
    "violence",
    "self-harm",
    "hate or harassment",
    "sexual content",
    "illegal activity",
    "privacy",
    "misinformation",
    "other",
)
MAX_BODY_BYTES = 16 * 2**20  # a request body over this is refused with 413
MAX_RATIONALE_CHARS = 5_000
MAX_TAGS = 50
MAX_TAG_CHARS = 200
MAX_RESPONSES = 16
MAX_TEXT_CHARS = 100_000  # one message or response
MAX_OVERLAP = 100
MAX_ID = 2**31 - 1
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline and carriage return are text


def text_problem(value, field: str, max_chars: int) -> str | None:
    if not isinstance(value, str):
        return f"field '{field}' must be a string"
    if len(value) > max_chars:
        return f"field '{field}' is {len(value)} characters long (at most {max_chars})"
    if CONTROL.search(value):
        return f"field '{field}' contains a control character (NUL or another C0 code)"
    return None


def rank_problem(ranks, k: int) -> str | None:
    """A ranking of k responses: one integer per response in 1..k, 1 = best present, equal numbers for ties."""
    if not isinstance(ranks, list) or len(ranks) != k:
        return f"field 'ranks' must hold {k} ranks, one per response"
    if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= k for r in ranks):
        return f"field 'ranks' must hold integers from 1 to {k} (1 = best, equal numbers for a tie)"
    if min(ranks) != 1:
        return "field 'ranks' must give rank 1 to the best response"
    return None


def annotation_problems(
    k: int,
    ranks,
    strength,
    unsafe,
    tags,
    rationale,
    known_tags: set[str] | None = None,
    skip: bool = False,
) -> list[str]:
    out = []
    if not skip and (p := rank_problem(ranks, k)):
        out.append(p)
    if strength is not None:
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            out.append("field 'strength' must be a finite number")
        elif not 0 <= strength <= 1:
            out.append("field 'strength' must lie in [0, 1]")
        elif k != 2:
            out.append(f"field 'strength' is only for a pair of responses (this task has {k})")
    if unsafe not in (None, "") and unsafe not in UNSAFE_CATEGORIES:
        out.append(f"field 'unsafe' must be one of: {', '.join(UNSAFE_CATEGORIES)}")
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        out.append(f"field 'tags' must be a list of at most {MAX_TAGS} strings")
    else:
        out += [p for i, t in enumerate(tags) if (p := text_problem(t, f"tags[{i}]", MAX_TAG_CHARS))]
        if known_tags is not None and (unknown := [t for t in tags if isinstance(t, str) and t not in known_tags]):
            out.append(f"field 'tags': not in the project's taxonomy: {', '.join(map(repr, unknown[:5]))}")
    if p := text_problem(rationale, "rationale", MAX_RATIONALE_CHARS):
        out.append(p)
    return out


def item_problems(item, where: str) -> list[str]:
    """The app's own limits on an import item, beyond the comparison-record contract (checked before this)."""
    if not isinstance(item, dict):
        return []
    out = []
    prompt = item.get("prompt")
    texts = [("prompt", prompt)] if isinstance(prompt, str) else []
    if isinstance(prompt, list):
        texts += [(f"prompt[{i}].content", m.get("content")) for i, m in enumerate(prompt) if isinstance(m, dict)]
    responses = item.get("responses")
    if isinstance(responses, list):
        if len(responses) > MAX_RESPONSES:
            out.append(f"{where}: field 'responses' has {len(responses)} responses (at most {MAX_RESPONSES})")
        texts += [(f"responses[{i}]", r) for i, r in enumerate(responses)]
    tags = item.get("tags") or []
    if isinstance(tags, list):
        if len(tags) > MAX_TAGS:
            out.append(f"{where}: field 'tags' has {len(tags)} tags (at most {MAX_TAGS})")
        texts += [(f"tags[{i}]", t) for i, t in enumerate(tags)]
    for field, value in texts:
        if isinstance(value, str) and (p := text_problem(value, field, MAX_TEXT_CHARS)):
            out.append(f"{where}: {p}")
    return out
