"""`align data inspect FILE…`: what a conversation or preference dataset holds, before anything trains on it.

For each file: the layout of each record (detected the way the SFT and reward-model readers detect it), counts per
layout, turns per conversation and the roles in them, what the readers would leave out and why (with the first
file:line of each reason), token-length percentiles with a given tokenizer, and a few rendered samples with the
tokens SFT would train on marked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from align.core.chatml import render
from align.core.records import DataError, iter_records
from base_model import QwenTokenizer
from rm import public_layouts
from rm.data import PairReport, left_out_reason, record_pairs
from sft.data import SkipExample, build_example, check_trainable, record_tools, to_messages
from sft.preview import render_preview

# the top-level fields some reader uses; any other field is listed, so that nothing is dropped unseen
READ_FIELDS = {
    "messages", "conversations", "system", "prompt", "chosen", "rejected", "responses", "ranking", "strength", "tags",
    "annotator", "source", "history", "human_ref_A", "human_ref_B", "labels", "domain", "question", "answers",
    "tools", "functions", "instruction", "input", "output", "completions", "message_tree_id", "response_0",
    "response_1", "better_response_id", "safer_response_id", "is_response_0_safe", "is_response_1_safe",
    "response_0_harm_category", "response_1_harm_category", "response_0_severity_level", "response_1_severity_level",
}  # fmt: skip
PUBLIC_LAYOUTS = {
    "ultrafeedback": "preference: UltraFeedback (rated completions)",
    "nectar": "preference: Nectar (K-wise ranks)",
    "oasst": "preference: OpenAssistant message tree",
    "oasst-message": "preference: OpenAssistant message row (needs the tree export)",
    "pku-saferlhf": "preference: PKU-SafeRLHF (with safety labels)",
}


def layout_of(record: dict) -> str:
    """The record's layout, named as the user knows it."""
    public = public_layouts.layout(record)
    if public:
        return PUBLIC_LAYOUTS[public]
    if "chosen" in record and "rejected" in record:
        chosen, prompt = record["chosen"], record.get("prompt")
        if isinstance(chosen, dict):
            return "preference: ShareGPT turns (LLaMA-Factory)"
        if isinstance(chosen, list):
            return "preference: TRL conversational, explicit prompt" if prompt else "preference: TRL conversational"
        if isinstance(prompt, str) and prompt.startswith("\n\nHuman: "):
            return "preference: DeepSpeed-Chat (HH transcript prompt)"
        return "preference: TRL standard, explicit prompt" if prompt is not None else "preference: Anthropic HH text"
    if "responses" in record:
        return "preference: comparison record (ranked)"
    if "human_ref_A" in record:
        return "preference: Stanford SHP"
    if "answers" in record:
        return "preference: forum thread (PMP)"
    tools = " with tools" if record.get("tools") or record.get("functions") else ""
    if "messages" in record:
        return "conversation: OpenAI messages" + tools
    if "conversations" in record:
        return "conversation: ShareGPT" + tools
    if "instruction" in record and "output" in record:
        return "conversation: Alpaca"
    return "unknown"


@dataclass
class FileReport:
    path: str
    records: int = 0
    layouts: Counter = field(default_factory=Counter)
    roles: Counter = field(default_factory=Counter)
    turns: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # per conversation, or per prompt + chosen reply
    pairs: int = 0
    unread: Counter = field(default_factory=Counter)  # fields no reader uses -> records that have them
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, message)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "records": self.records,
            "layouts": dict(self.layouts),
            "roles": dict(self.roles),
            "turns": _summary(self.turns),
            "tokens": _summary(self.tokens),
            "pairs": self.pairs,
            "unread_fields": dict(self.unread),
            "skipped": dict(self.skipped),
            "first_skipped": self.first_skipped,
            "samples": self.samples,
        }


def _summary(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        "mean": round(float(a.mean()), 1),
        **{f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)},
        "max": int(a.max()),
    }


def inspect_file(path: str, tokenizer: QwenTokenizer, max_len: int = 2048, n_samples: int = 3) -> FileReport:
    """One file's report (see the module docstring). Bad lines and unreadable records are counted, never fatal."""
    report = FileReport(path)
    for where, record in iter_records(path, on_bad_line=lambda msg: report.skip("not a JSON object", msg)):
        report.records += 1
        layout = layout_of(record)
        report.layouts[layout] += 1
        report.unread.update(k for k in record if k not in READ_FIELDS)
        try:
            if layout.startswith("preference"):
                _preference(record, where, tokenizer, report, n_samples)
            elif layout.startswith("conversation"):
                _conversation(record, where, tokenizer, max_len, report, n_samples)
            else:
                raise DataError(f"{where}: unknown layout (fields: {', '.join(record) or 'none'})")
        except SkipExample as e:  # as SFT's reader counts them
            reason = "too long" if "does not fit" in str(e) else "untrainable"
            report.skip(reason, str(e) if str(e).startswith(where) else f"{where}: {e}")
        except DataError as e:
            report.skip(left_out_reason(e), str(e))
    return report


def _conversation(record, where, tokenizer, max_len, report: FileReport, n_samples: int) -> None:
    messages = to_messages(record, where)
    report.roles.update(m["role"] for m in messages)
    report.turns.append(len(messages))
    check_trainable(messages, where)
    example = build_example(messages, tokenizer, max_len, tools=record_tools(record, where))
    report.tokens.append(len(example["input_ids"]))
    if len(report.samples) < n_samples:
        report.samples.append(
            f"--- {where}\n" + render_preview(example["input_ids"], example["labels"], tokenizer, False)
        )


def _preference(record, where, tokenizer, report: FileReport, n_samples: int) -> None:
    pairs = record_pairs(record, where, binarize=False, report=PairReport())
    if not pairs:  # a ranking with every response tied, a forum thread with equal scores
        report.skip("no pair (all tied)", f"{where}: every response is tied")
        return
    report.pairs += len(pairs)
    first = pairs[0]
    report.roles.update(m["role"] for m in first.prompt)
    report.turns.append(len(first.prompt) + 1)
    chosen = first.prompt + [{"role": "assistant", "content": first.chosen}]
    report.tokens.append(len(render(chosen, tokenizer)))
    if len(report.samples) < n_samples:
        prompt = tokenizer.decode(render(first.prompt, tokenizer, add_generation_prompt=True))
        report.samples.append(
            f"--- {where} ({len(pairs)} pair{'s' if len(pairs) != 1 else ''})\n{prompt}\n"
            f"[chosen] {first.chosen[:300]}\n[rejected] {first.rejected[:300]}"
        )


def format_report(report: FileReport) -> str:
    lines = [f"== {report.path}: {report.records} records"]
    for layout, n in report.layouts.most_common():
        lines.append(f"  {n:>8}  {layout}")
    if report.pairs:
        lines.append(f"  preference pairs: {report.pairs}")
    if report.roles:
        lines.append("  roles: " + ", ".join(f"{r} {n}" for r, n in report.roles.most_common()))
    for name, values in (("turns per conversation", report.turns), ("tokens", report.tokens)):
        if s := _summary(values):
            lines.append(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    if report.unread:
        lines.append(
            "  fields no reader uses: " + ", ".join(f"{k} ({n} records)" for k, n in report.unread.most_common())
        )
    if report.skipped:
        lines.append("  left out by the readers:")
        for reason, n in report.skipped.most_common():
            lines.append(f"  {n:>8}  {reason}; first: {report.first_skipped[reason]}")
    else:
        lines.append("  left out by the readers: nothing")
    if report.samples:
        lines.append("  samples (in conversations, the tokens SFT trains on are between ⟦ ⟧):")
        lines += report.samples
    return "\n".join(lines)
