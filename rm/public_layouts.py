"""Ranked public preference datasets as comparison records (prompt, responses, ranking, tags).

Each reader turns one record of a public dataset, as its own files hold it, into comparison records
(`align.core.records.ComparisonRecord` dicts), which the reward model, the labelling app's import and the tag
audit all read:

- **UltraFeedback** (`instruction`, `completions` with GPT-4 `annotations`): completions ranked by their
  `fine-grained_score` (the mean of the four aspect ratings, computed from `annotations` when the field is absent);
  completions without a rating are left out; equal scores are ties.
- **Nectar** (`prompt` an HH transcript, `answers` with a K-wise `rank`): the ranks as they are.
- **OpenAssistant trees** (`message_tree_id`, `prompt` a message node with nested `replies`; the
  `*.trees.jsonl` exports): one record per prompter message whose assistant replies carry ranks, the prompt being
  the conversation down to it.
- **PKU-SafeRLHF** (`response_0/1`, `better_response_id`, `safer_response_id`, `is_response_*_safe`, harm
  categories, severity): when exactly one response is safe it is preferred (a single reward model for
  helpfulness and harmlessness never prefers an unsafe reply over a safe one), otherwise the more helpful one.
  Harm categories become `safety/…` tags (what the tag audit counts) and the per-response labels travel in the
  record's `meta` (`safe`, `severity_level`, `harm_categories`, `better_response_id`, `safer_response_id`), which
  the labelling app keeps with the task and writes back in its export.
"""

from __future__ import annotations

import math
import re

from align.core.records import DataError


class NoComparison(DataError):
    """A well-formed record that holds no comparison (fewer than two rated or ranked responses)."""


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def layout(record: dict) -> str | None:
    """Which ranked public layout a record has, or None."""
    if "instruction" in record and "completions" in record:
        return "ultrafeedback"
    answers = record.get("answers")
    if isinstance(answers, list) and answers and isinstance(answers[0], dict) and "rank" in answers[0]:
        return "nectar"
    if "message_tree_id" in record and isinstance(record.get("prompt"), dict):
        return "oasst"
    if "message_tree_id" in record and "parent_id" in record:
        return "oasst-message"
    if "response_0" in record and "response_1" in record and "better_response_id" in record:
        return "pku-saferlhf"
    return None


def dense_ranking(scores: list[float]) -> list[int]:
    """Scores (higher is better) → ranks (1 = best; equal scores share a rank)."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) + 1 for s in scores]


def ultrafeedback_score(completion: dict) -> float | None:
    """The completion's `fine-grained_score`, or the mean of its aspect ratings; None when it has neither."""
    score = completion.get("fine-grained_score")
    if isinstance(score, (int, float)) and not math.isnan(score):
        return float(score)
    ratings = []
    for aspect in (completion.get("annotations") or {}).values():
        items = aspect if isinstance(aspect, list) else [aspect]
        for item in items:
            rating = item.get("Rating") if isinstance(item, dict) else None
            if isinstance(rating, (str, int, float)) and str(rating).strip().isdigit():
                ratings.append(float(rating))
    return sum(ratings) / len(ratings) if ratings else None


def ultrafeedback_records(record: dict, where: str) -> list[dict]:
    instruction, completions = record.get("instruction"), record.get("completions")
    if not isinstance(instruction, str) or not isinstance(completions, list):
        raise DataError(f"{where}: an UltraFeedback record needs 'instruction' (string) and 'completions' (list)")
    scored = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise DataError(f"{where}: field 'completions[{i}].response' must be a string")
        score = ultrafeedback_score(c)
        if score is not None:
            scored.append((c["response"], score, c.get("model")))
    if len(scored) < 2:
        raise NoComparison(f"{where}: fewer than two rated completions (UltraFeedback), so no comparison")
    return [
        {
            "prompt": [{"role": "user", "content": instruction}],
            "responses": [r for r, _, _ in scored],
            "ranking": dense_ranking([s for _, s, _ in scored]),
            "source": f"ultrafeedback/{record.get('source', '')}".rstrip("/"),
            "meta": {"models": [m for _, _, m in scored], "scores": [s for _, s, _ in scored]},
        }
    ]


def hh_transcript_messages(text: str, where: str) -> list[dict]:
    """An HH transcript that ends at the assistant's turn ('\\n\\nHuman: …\\n\\nAssistant:') → its messages."""
    parts = _HH_TURN.split(text.rstrip(" "))
    if len(parts) < 3 or parts[0].strip() or parts[-2] != "Assistant" or parts[-1].strip():
        raise DataError(f"{where}: field 'prompt' must be an HH transcript ending with '\\n\\nAssistant:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts) - 2, 2)]


def nectar_records(record: dict, where: str) -> list[dict]:
    prompt, answers = record.get("prompt"), record["answers"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: a Nectar record needs 'prompt' (an HH transcript)")
    responses, ranking = [], []
    for i, a in enumerate(answers):
        rank = a.get("rank") if isinstance(a, dict) else None
        if not isinstance(a.get("answer"), str) or not isinstance(rank, (int, float)) or rank < 1:
            raise DataError(f"{where}: field 'answers[{i}]' needs 'answer' (string) and 'rank' (a number >= 1)")
        responses.append(a["answer"])
        ranking.append(int(rank))
    if len(responses) < 2:
        raise NoComparison(f"{where}: fewer than two answers (Nectar), so no comparison")
    sources = record.get("source") or []
    return [
        {
            "prompt": hh_transcript_messages(prompt, where),
            "responses": responses,
            "ranking": ranking,
            "source": "nectar/" + ",".join(sources) if sources else "nectar",
            "meta": {"models": [a.get("model") for a in answers]},
        }
    ]


def oasst_records(record: dict, where: str) -> list[dict]:
    """Every ranked set of sibling assistant replies in one OpenAssistant message tree."""
    out: list[dict] = []
    roles = {"prompter": "user", "assistant": "assistant"}

    def walk(node: dict, path: list[dict], at: str) -> None:
        if not isinstance(node, dict) or node.get("role") not in roles or not isinstance(node.get("text"), str):
            raise DataError(f"{where}: {at} must be a message with 'role' (prompter|assistant) and 'text'")
        path = path + [{"role": roles[node["role"]], "content": node["text"]}]
        replies = node.get("replies") or []
        ranked = [r for r in replies if isinstance(r, dict) and isinstance(r.get("rank"), int)]
        if node["role"] == "prompter" and len(ranked) >= 2:
            out.append(
                {
                    "prompt": path,
                    "responses": [r["text"] for r in ranked],
                    "ranking": [r["rank"] + 1 for r in ranked],  # OpenAssistant ranks from 0
                    "source": f"oasst/{node.get('lang', '')}".rstrip("/"),
                    "meta": {"message_ids": [r.get("message_id") for r in ranked]},
                }
            )
        for i, reply in enumerate(replies):
            walk(reply, path, f"{at}.replies[{i}]")

    walk(record["prompt"], [], "field 'prompt'")
    if not out:
        raise NoComparison(f"{where}: no prompter message with two or more ranked replies (OpenAssistant tree)")
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def pku_records(record: dict, where: str) -> list[dict]:
    try:
        prompt, responses = record["prompt"], [record["response_0"], record["response_1"]]
        better, safer = int(record["better_response_id"]), int(record["safer_response_id"])
        safe = [bool(record["is_response_0_safe"]), bool(record["is_response_1_safe"])]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{where}: a PKU-SafeRLHF record needs prompt, response_0/1, better_response_id, safer_response_id and "
            f"is_response_0/1_safe ({e})"
        ) from None
    if not isinstance(prompt, str) or not all(isinstance(r, str) for r in responses) or {better, safer} - {0, 1}:
        raise DataError(f"{where}: PKU-SafeRLHF prompt and responses must be strings and the ids 0 or 1")
    chosen = safer if safe[0] != safe[1] else better
    harms = [sorted(k for k, v in (record.get(f"response_{i}_harm_category") or {}).items() if v) for i in range(2)]
    tags = sorted({f"safety/{_slug(h)}" for h in harms[0] + harms[1]})
    return [
        {
            "prompt": [{"role": "user", "content": prompt}],
            "responses": responses,
            "ranking": [1, 2] if chosen == 0 else [2, 1],
            "tags": tags,
            "source": "pku-saferlhf",
            "meta": {
                "safe": safe,
                "severity_level": [record.get("response_0_severity_level"), record.get("response_1_severity_level")],
                "harm_categories": harms,
                "better_response_id": better,
                "safer_response_id": safer,
            },
        }
    ]


READERS = {
    "ultrafeedback": ultrafeedback_records,
    "nectar": nectar_records,
    "oasst": oasst_records,
    "pku-saferlhf": pku_records,
}


def comparison_records(record: dict, where: str) -> list[dict] | None:
    """The comparison records of a ranked public-layout record, or None when it has none of these layouts."""
    kind = layout(record)
    if kind == "oasst-message":
        raise DataError(
            f"{where}: an OpenAssistant message row (one message per line); use the message-tree export "
            "(`*.trees.jsonl`), whose records hold whole trees"
        )
    return READERS[kind](record, where) if kind else None
