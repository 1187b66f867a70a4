"""Reward-model data: comparison records, their pairs, public layouts, and PMP pairs from forum votes.

A comparison record (`align.core.records.ComparisonRecord`, the labelling app's export format) holds a prompt,
2..K responses and the rank of each (1 = best, equal = tie), with optional strength, tags, annotator and source.
A ranking of K responses expands to every ordered pair with different ranks; ties give no pair and are counted.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from align.core.records import ComparisonRecord, DataError, as_messages, iter_records
from rm import public_layouts
from sft.data import to_messages


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    strength: float | None = None
    tags: list[str] = field(default_factory=list)
    source: str = ""
    annotator: str | None = None


@dataclass
class PairReport:
    records: int = 0
    pairs: int = 0
    ties: int = 0
    layouts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason -> records left out (on_error="skip")
    examples: list[str] = field(default_factory=list)  # the first few left out, with file:line

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def ranking_pairs(ranking: list[int]) -> tuple[list[tuple[int, int]], int]:
    """Ordered (better, worse) index pairs of a ranking (1 = best), and the number of tied pairs."""
    pairs, ties = [], 0
    for i in range(len(ranking)):
        for j in range(i + 1, len(ranking)):
            if ranking[i] < ranking[j]:
                pairs.append((i, j))
            elif ranking[j] < ranking[i]:
                pairs.append((j, i))
            else:
                ties += 1
    return pairs, ties


def comparison_pairs(record: dict, where: str) -> tuple[list[Pair], int]:
    """Pairs of one comparison record, and its tie count."""
    r = ComparisonRecord.parse(record, where)
    index_pairs, ties = ranking_pairs(r.ranking)
    pairs = [
        Pair(r.prompt, r.responses[i], r.responses[j], r.strength, r.tags, r.source, r.annotator)
        for i, j in index_pairs
    ]
    return pairs, ties


# --------------------------------------------------------------------------------------- public layouts

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_text(text: str, where: str) -> tuple[list[dict], str]:
    """Anthropic HH text ('\\n\\nHuman: …\\n\\nAssistant: …') → (prompt messages, final assistant reply)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[-2] != "Assistant":
        raise DataError(f"{where}: HH text must alternate '\\n\\nHuman:' and '\\n\\nAssistant:' turns and end with one")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]
    return messages[:-1], messages[-1]["content"]


class MultiTurnReplies(DataError):
    """HH chosen/rejected texts that part before their last reply: what follows the shared turns is several turns,
    not one reply each (5 of the 2,312 rows of hh-rlhf harmless-base/test)."""


def split_hh_pair(chosen: str, rejected: str, where: str) -> tuple[list[dict], str, str]:
    """HH chosen/rejected texts → (shared prompt messages, chosen reply, rejected reply). The prompt is the longest
    common prefix that ends at an assistant turn, as TRL's `extract_prompt`: usually everything before the last
    reply. Raises MultiTurnReplies when the texts part earlier and a side continues for more than one reply."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind("\n\nAssistant:", 0, common)  # the last assistant turn inside the shared prefix
    if cut < 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no HH turns ending at an assistant turn")
    head = chosen[: cut + len("\n\nAssistant:")]
    replies = [text[len(head) :].removeprefix(" ") for text in (chosen, rejected)]
    if any(_HH_TURN.search(r) for r in replies):
        raise MultiTurnReplies(f"{where}: 'chosen' and 'rejected' part before the last reply (multi-turn replies)")
    prompt, _ = parse_hh_text(head + " ", where)
    return prompt, replies[0], replies[1]


def _hh_transcript(prompt: str) -> bool:
    """A DeepSpeed-Chat / Dahoas `prompt`: an HH transcript ending at the assistant's turn."""
    return prompt.startswith("\n\nHuman: ") and prompt.rstrip().endswith("\n\nAssistant:")


def chosen_rejected_pair(record: dict, where: str) -> Pair:
    """`chosen`/`rejected` as HH text or as message lists (sharing the prompt), with an optional `prompt`: TRL's
    explicit layouts (a prompt string or messages, then the replies), DeepSpeed-Chat's (`prompt` an HH transcript),
    LLaMA-Factory's (`conversations` or `messages`, then one turn each)."""
    chosen, rejected = record["chosen"], record["rejected"]
    source = record.get("source", "hh")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = record.get("prompt")
        if isinstance(prompt, str) and _hh_transcript(prompt):
            messages, _ = parse_hh_text(prompt.rstrip() + " ", where + " (prompt)")
            return Pair(messages, chosen.removeprefix(" "), rejected.removeprefix(" "), source=source)
        if prompt is not None:
            return Pair(as_messages(prompt, where), chosen, rejected, source=source)
        return Pair(*split_hh_pair(chosen, rejected, where), source=source)
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = as_messages(chosen, where), as_messages(rejected, where)
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or c[:-1] != r[:-1]:
            raise DataError(f"{where}: 'chosen'/'rejected' message lists must share a prompt and end with the reply")
        prompt = as_messages(record["prompt"], where) if "prompt" in record else []  # TRL's explicit prompt
        return Pair(prompt + c[:-1], c[-1]["content"], r[-1]["content"], source=source)
    if isinstance(chosen, dict) and isinstance(rejected, dict):  # LLaMA-Factory: ShareGPT/OpenAI turns, one reply each
        prompt = to_messages(record, where)
        replies = [
            to_messages({"conversations": [t]} if "from" in t else {"messages": [t]}, where) for t in (chosen, rejected)
        ]
        if any(reply[0]["role"] != "assistant" for reply in replies):
            raise DataError(f"{where}: fields 'chosen' and 'rejected' must be assistant turns")
        return Pair(prompt, replies[0][0]["content"], replies[1][0]["content"], source=record.get("source", "sharegpt"))
    raise DataError(
        f"{where}: fields 'chosen' and 'rejected' must both be strings, message lists or single turns (ShareGPT)"
    )


def shp_pair(record: dict, where: str) -> Pair:
    """Stanford SHP: `history`, `human_ref_A`, `human_ref_B`, `labels` (1 when A is preferred)."""
    try:
        a, b, label = record["human_ref_A"], record["human_ref_B"], int(record["labels"])
        prompt = [{"role": "user", "content": record["history"]}]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: SHP record needs history, human_ref_A, human_ref_B and labels ({e})") from None
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return Pair(prompt, chosen, rejected, source=record.get("domain", "shp"))


# --------------------------------------------------------------------------------------------------- PMP


def pmp_score(upvotes: int, accepted: bool) -> int:
    """Askell et al. (2021): round(log2(1 + upvotes)), +1 if accepted; -1 if the votes are negative."""
    if upvotes < 0:
        return -1
    return int(math.floor(math.log2(1 + upvotes) + 0.5)) + (1 if accepted else 0)


def forum_pairs(record: dict, where: str, binarize: bool = True) -> list[Pair]:
    """A forum thread {"question", "answers": [{"text", "upvotes", "accepted"}]} → PMP pairs.

    Every two answers with different scores give a pair (higher score preferred). With `binarize`, each pair
    A > B also gives "GOOD:A" > "BAD:A" and "BAD:B" > "GOOD:B", as in Askell et al."""
    question, answers = record.get("question"), record.get("answers")
    if not isinstance(question, str) or not isinstance(answers, list):
        raise DataError(f"{where}: a forum thread needs 'question' (string) and 'answers' (list)")
    scored = []
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not isinstance(a.get("upvotes"), int):
            raise DataError(f"{where}: field 'answers[{i}]' needs 'text' (string) and 'upvotes' (integer)")
        scored.append((pmp_score(a["upvotes"], bool(a.get("accepted", False))), a["text"]))
    prompt = [{"role": "user", "content": question}]
    tags = record.get("tags") or []
    pairs = []
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            (si, ti), (sj, tj) = scored[i], scored[j]
            if si == sj:
                continue
            good, bad = (ti, tj) if si > sj else (tj, ti)
            pairs.append(Pair(prompt, good, bad, tags=tags, source="pmp"))
            if binarize:
                pairs.append(Pair(prompt, f"GOOD:{good}", f"BAD:{good}", tags=tags, source="pmp-binarized"))
                pairs.append(Pair(prompt, f"BAD:{bad}", f"GOOD:{bad}", tags=tags, source="pmp-binarized"))
    return pairs


def record_pairs(record: dict, where: str, binarize: bool, report: PairReport) -> list[Pair]:
    """The pairs of one record, whatever its layout; counts its layout and ties in `report`."""
    public = public_layouts.comparison_records(record, where)
    if public is not None:
        new = []
        for r in public:
            pairs, ties = comparison_pairs(r, where)
            new += pairs
            report.ties += ties
        report.layouts[public_layouts.layout(record)] += 1
    elif "responses" in record:
        new, ties = comparison_pairs(record, where)
        report.ties += ties
        report.layouts["comparison"] += 1
    elif "chosen" in record and "rejected" in record:
        new = [chosen_rejected_pair(record, where)]
        report.layouts["chosen/rejected"] += 1
    elif "human_ref_A" in record:
        new = [shp_pair(record, where)]
        report.layouts["shp"] += 1
    elif "answers" in record:
        new = forum_pairs(record, where, binarize)
        report.layouts["forum"] += 1
    else:
        raise DataError(
            f"{where}: unknown record layout (expected 'responses'+'ranking', 'chosen'+'rejected', "
            f"SHP 'human_ref_A'/'human_ref_B', a forum thread with 'answers', or UltraFeedback, Nectar, "
            f"OpenAssistant tree or PKU-SafeRLHF records)"
        )
    return new


def left_out_reason(error: DataError) -> str:
    """Why a record that gives no pair is left out, as the readers' reports count it."""
    if isinstance(error, MultiTurnReplies):
        return "multi-turn replies"
    return "no comparison" if isinstance(error, public_layouts.NoComparison) else "malformed"


def pair_record(pair: Pair) -> dict:
    """A pair as a two-response comparison record (chosen first)."""
    record = ComparisonRecord(pair.prompt, [pair.chosen, pair.rejected], [1, 2], pair.strength, list(pair.tags))
    record.annotator, record.source = pair.annotator, pair.source
    return record.to_dict()


def load_comparisons(path: str, on_error: Literal["raise", "skip"] = "raise") -> tuple[list[dict], PairReport]:
    """Every record of a preference file as comparison records: ranked public layouts and comparison records keep
    their whole ranking (and `meta`), other layouts give one record per pair. Left-out records are counted as
    `load_pairs` counts them."""
    report = PairReport()
    out: list[dict] = []
    on_bad_line = (lambda msg: report.skip("malformed", msg)) if on_error == "skip" else None
    for where, record in iter_records(path, on_bad_line):
        report.records += 1
        try:
            public = public_layouts.comparison_records(record, where)
            if public is not None:
                report.layouts[public_layouts.layout(record)] += 1
                out += [ComparisonRecord.parse(r, where).to_dict() for r in public]
            elif "responses" in record:
                report.layouts["comparison"] += 1
                out.append(ComparisonRecord.parse(record, where).to_dict())
            else:
                out += [pair_record(p) for p in record_pairs(record, where, binarize=False, report=report)]
        except DataError as e:
            if on_error == "raise":
                raise
            report.skip(left_out_reason(e), str(e))
    report.pairs = len(out)
    return out, report


def load_pairs(
    path: str, binarize: bool = True, on_error: Literal["raise", "skip"] = "raise"
) -> tuple[list[Pair], PairReport]:
    """Every pair in a file, whatever its layout (detected per record). A record that cannot be read, or that
    gives no single-reply pair (HH rows parting early), stops the load (`on_error="raise"`) or is left out and
    counted in the report with its file:line (`"skip"`)."""
    report = PairReport()
    pairs: list[Pair] = []
    on_bad_line = (lambda msg: report.skip("malformed", msg)) if on_error == "skip" else None
    for where, record in iter_records(path, on_bad_line):
        report.records += 1
        try:
            pairs.extend(record_pairs(record, where, binarize, report))
        except DataError as e:
            if on_error == "raise":
                raise
            report.skip(left_out_reason(e), str(e))
    report.pairs = len(pairs)
    if not pairs:
        left_out = "".join(f", {n} left out: {reason}" for reason, n in report.skipped.items())
        first = f"; first: {report.examples[0]}" if report.examples else ""
        raise DataError(f"{path}: no preference pairs ({report.records} records, {report.ties} ties{left_out}){first}")
    return pairs, report


# ------------------------------------------------------------------------------------------------ tensors


def encode_response(
    prompt: list[dict], response: str, tokenizer, max_len: int, end_token_id: int
) -> tuple[list[int], list[int], bool]:
    """ChatML ids of prompt + response, then the reward end token; a mask of the response tokens (content and
    its <|im_end|>). Over-long sequences lose tokens from the front (the reward is read at the end)."""
    from align.core.chatml import render_turns

    ids, turns = render_turns(list(prompt) + [{"role": "assistant", "content": response}], tokenizer)
    last = turns[-1]
    mask = [0] * len(ids)
    mask[last.content_start : last.content_end + 1] = [1] * (last.content_end + 1 - last.content_start)
    ids, mask = ids + [end_token_id], mask + [0]
    truncated = len(ids) > max_len
    return ids[-max_len:], mask[-max_len:], truncated


def collate_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-pad (ids, response_mask) sequences into input_ids, attention_mask, response_mask (B, L)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        response_mask[i, : len(mask)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def encode_pairs(pairs: list[Pair], tokenizer, max_len: int, end_token_id: int) -> tuple[list[dict], int]:
    """Each pair as {"chosen": (ids, mask), "rejected": (ids, mask), "strength"}; and how many were truncated."""
    out, truncated = [], 0
    for p in pairs:
        c_ids, c_mask, c_cut = encode_response(p.prompt, p.chosen, tokenizer, max_len, end_token_id)
        r_ids, r_mask, r_cut = encode_response(p.prompt, p.rejected, tokenizer, max_len, end_token_id)
        truncated += int(c_cut or r_cut)
        out.append(
            {
                "chosen": (c_ids, c_mask),
                "rejected": (r_ids, r_mask),
                "strength": 0.0 if p.strength is None else float(p.strength),
            }
        )
    return out, truncated


def collate_pairs(encoded: list[dict], pad_id: int) -> dict:
    """Chosen sequences first, then rejected: rows [0, B) and [B, 2B) of one batch."""
    import torch

    batch = collate_sequences([e["chosen"] for e in encoded] + [e["rejected"] for e in encoded], pad_id)
    batch["strength"] = torch.tensor([e["strength"] for e in encoded], dtype=torch.float32)
    return batch
