"""Reward-model data: rankings to pairs, PMP scores and binarisation, public layouts, errors."""

import json
from pathlib import Path

import pytest

from align.core.records import DataError
from rm.data import (
    chosen_rejected_pair,
    comparison_pairs,
    forum_pairs,
    load_pairs,
    parse_hh_text,
    pmp_score,
    ranking_pairs,
    shp_pair,
)


def test_three_way_ranking_with_a_tie():
    pairs, ties = ranking_pairs([2, 1, 2])  # response 1 best, 0 and 2 tied
    assert sorted(pairs) == [(1, 0), (1, 2)] and ties == 1
    record = {
        "prompt": [{"role": "user", "content": "q"}],
        "responses": ["a", "b", "c"],
        "ranking": [2, 1, 2],
        "strength": 0.5,
        "tags": ["t"],
        "annotator": "x",
    }
    pairs, ties = comparison_pairs(record, "f:1")
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a"), ("b", "c")] and ties == 1
    assert pairs[0].strength == 0.5 and pairs[0].tags == ["t"] and pairs[0].annotator == "x"


def test_full_ranking_gives_all_ordered_pairs():
    pairs, ties = ranking_pairs([3, 1, 4, 2])
    assert ties == 0 and len(pairs) == 6
    assert all(r_better < r_worse for r_better, r_worse in ((([3, 1, 4, 2])[i], ([3, 1, 4, 2])[j]) for i, j in pairs))


@pytest.mark.parametrize(
    "upvotes,accepted,score",
    [
        (0, False, 0),
        (1, False, 1),
        (2, False, 2),
        (3, False, 2),
        (10, False, 3),
        (10, True, 4),
        (0, True, 1),
        (-1, False, -1),
        (-5, True, -1),
    ],
)
def test_pmp_score_by_hand(upvotes, accepted, score):
    # round(log2(1 + upvotes)): log2(3) = 1.58 -> 2, log2(4) = 2, log2(11) = 3.46 -> 3; +1 if accepted; -1 if negative
    assert pmp_score(upvotes, accepted) == score


def test_forum_thread_pairs_and_binarisation_by_hand():
    thread = {
        "question": "Q?",
        "answers": [
            {"text": "A", "upvotes": 3, "accepted": True},  # score 3
            {"text": "B", "upvotes": 1},  # score 1
            {"text": "C", "upvotes": -2},  # score -1
            {"text": "D", "upvotes": 1},
        ],
    }  # score 1, ties with B: no pair
    plain = forum_pairs(thread, "f:1", binarize=False)
    assert sorted((p.chosen, p.rejected) for p in plain) == [("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("D", "C")]
    full = forum_pairs(thread, "f:1", binarize=True)
    assert len(full) == 15
    first = [(p.chosen, p.rejected) for p in full[:3]]
    assert first == [("A", "B"), ("GOOD:A", "BAD:A"), ("BAD:B", "GOOD:B")]
    assert all(p.prompt == [{"role": "user", "content": "Q?"}] for p in full)


def test_hh_and_shp_layouts():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: goodbye!"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: whatever"
    pair = chosen_rejected_pair({"chosen": chosen, "rejected": rejected}, "f:1")
    assert pair.prompt == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    assert (pair.chosen, pair.rejected) == ("goodbye!", "whatever")
    msgs = lambda r: [{"role": "user", "content": "q"}, {"role": "assistant", "content": r}]
    pair = chosen_rejected_pair({"chosen": msgs("good"), "rejected": msgs("bad")}, "f:1")
    assert (pair.chosen, pair.rejected) == ("good", "bad")
    pair = shp_pair({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 0}, "f:1")
    assert (pair.chosen, pair.rejected) == ("b", "a")
    with pytest.raises(DataError, match="must alternate"):
        parse_hh_text("no turns here", "f:3")


def test_malformed_records_name_file_line_and_field(tmp_path):
    path = tmp_path / "c.jsonl"
    good = {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 2]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "responses": ["only one"], "ranking": [1]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'responses' must be a list of at least 2"):
        load_pairs(str(path))
    path.write_text(json.dumps({**good, "ranking": [1]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'ranking'"):
        load_pairs(str(path))
    path.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1: unknown record layout"):
        load_pairs(str(path))
    path.write_text(json.dumps({**good, "ranking": [1, 1]}) + "\n")
    with pytest.raises(DataError, match="no preference pairs"):
        load_pairs(str(path))


PUBLIC = Path(__file__).parent / "fixtures" / "public_rows"  # real rows; sources in its SOURCES.md


def test_real_hh_rows_split_at_the_last_reply_as_before():
    """Ordinary HH rows: the shared turns are the prompt, the last replies the pair (the old whole-text parse)."""
    pairs, report = load_pairs(str(PUBLIC / "hh_rlhf_harmless_test_sample.jsonl"))
    rows = [json.loads(l) for l in (PUBLIC / "hh_rlhf_harmless_test_sample.jsonl").read_text().splitlines()]
    assert len(pairs) == len(rows) == 4 and not report.skipped
    for pair, row in zip(pairs, rows):
        prompt, chosen = parse_hh_text(row["chosen"], "c")
        _, rejected = parse_hh_text(row["rejected"], "r")
        assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen, rejected)
        assert pair.prompt[-1]["role"] == "user"


def test_real_hh_rows_that_part_early_are_reported_not_fatal(tmp_path):
    mixed = tmp_path / "hh.jsonl"
    mixed.write_text(
        (PUBLIC / "hh_rlhf_harmless_test_sample.jsonl").read_text()
        + (PUBLIC / "hh_rlhf_harmless_test_divergent.jsonl").read_text()
    )
    pairs, report = load_pairs(str(mixed), on_error="skip")
    assert len(pairs) == 4 and report.records == 9
    assert report.skipped == {"multi-turn replies": 5}
    assert report.examples[0].startswith(f"{mixed}:5: 'chosen' and 'rejected' part before the last reply")
    with pytest.raises(DataError, match=r"hh.jsonl:5: 'chosen' and 'rejected' part before the last reply"):
        load_pairs(str(mixed), on_error="raise")


def test_real_trl_layouts_keep_their_prompts():
    explicit, _ = load_pairs(str(PUBLIC / "trl_pref_conversational_explicit.jsonl"))
    implicit, _ = load_pairs(str(PUBLIC / "trl_pref_conversational_implicit.jsonl"))
    sky = [{"role": "user", "content": "What color is the sky?"}]
    for (pair,) in (explicit, implicit):
        assert (pair.prompt, pair.chosen, pair.rejected) == (sky, "It is blue.", "It is green.")
    (standard,) = load_pairs(str(PUBLIC / "trl_pref_standard_explicit.jsonl"))[0]
    assert (standard.prompt, standard.chosen, standard.rejected) == (
        [{"role": "user", "content": "The sky is"}],
        " blue.",
        " green.",
    )


def test_real_llamafactory_sharegpt_preference_row():
    row = json.loads((PUBLIC / "sharegpt_pref_llamafactory_dpo.jsonl").read_text())
    ((pair,), report) = load_pairs(str(PUBLIC / "sharegpt_pref_llamafactory_dpo.jsonl"))
    assert pair.prompt == [{"role": "user", "content": row["conversations"][0]["value"]}]
    assert (pair.chosen, pair.rejected) == (row["chosen"]["value"], row["rejected"]["value"])
    bad = {**row, "chosen": {"from": "human", "value": "x"}}
    with pytest.raises(DataError, match="f:1: fields 'chosen' and 'rejected' must be assistant turns"):
        chosen_rejected_pair(bad, "f:1")


def test_deepspeed_chat_prompt_transcripts_become_turns():
    """The Dahoas/DeepSpeed-Chat layout (prompt = HH transcript up to the last 'Assistant:') gives the same pair as
    the HH row it was made from."""
    (pair,) = load_pairs(str(PUBLIC / "hh_dahoas_layout.jsonl"))[0]
    hh = json.loads((PUBLIC / "hh_rlhf_harmless_test_sample.jsonl").read_text().splitlines()[1])
    (expected,) = load_pairs_from_rows([hh])
    assert (pair.prompt, pair.chosen, pair.rejected) == (expected.prompt, expected.chosen, expected.rejected)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user", "assistant", "user"]


def load_pairs_from_rows(rows):
    return [chosen_rejected_pair(r, f"row {i}") for i, r in enumerate(rows)]


def test_malformed_records_are_skipped_and_counted_when_asked(tmp_path):
    path = tmp_path / "c.jsonl"
    good = {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 2]}
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"foo": 1}) + "\n")
    pairs, report = load_pairs(str(path), on_error="skip")
    assert len(pairs) == 1 and report.skipped == {"malformed": 2}
    assert report.examples[1].startswith(f"{path}:3: unknown record layout")


def test_real_pku_saferlhf_rows_prefer_the_safe_reply_and_carry_safety_labels():
    from rm.public_layouts import comparison_records

    rows = [json.loads(line) for line in (PUBLIC / "pku_saferlhf_alpaca7b_test.jsonl").read_text().splitlines()]
    pairs, report = load_pairs(str(PUBLIC / "pku_saferlhf_alpaca7b_test.jsonl"))
    assert report.layouts == {"pku-saferlhf": 2} and len(pairs) == 2
    both_safe, one_safe = pairs
    assert both_safe.prompt == [{"role": "user", "content": rows[0]["prompt"]}] and both_safe.tags == []
    assert (both_safe.chosen, both_safe.rejected) == (rows[0]["response_1"], rows[0]["response_0"])  # better id 1
    assert (one_safe.chosen, one_safe.rejected) == (rows[1]["response_1"], rows[1]["response_0"])  # the safe one
    assert one_safe.tags == ["safety/endangering-national-security", "safety/violence"]
    (record,) = comparison_records(rows[1], "f:2")
    assert record["meta"]["safe"] == [False, True] and record["meta"]["severity_level"] == [1, 0]
    assert record["meta"]["harm_categories"] == [["Endangering National Security", "Violence"], []]
    # when exactly one reply is safe it wins even if the other was judged more helpful
    (swapped,) = comparison_records({**rows[1], "better_response_id": 0}, "f:2")
    assert swapped["ranking"] == [2, 1]
    (helpful,) = comparison_records({**rows[0], "better_response_id": 0, "safer_response_id": 1}, "f:1")
    assert helpful["ranking"] == [1, 2]  # both safe: the more helpful one
    with pytest.raises(DataError, match="f:1: a PKU-SafeRLHF record needs"):
        comparison_records({k: v for k, v in rows[0].items() if k != "is_response_1_safe"}, "f:1")


def test_real_nectar_row_gives_its_seven_way_ranking():
    row = json.loads((PUBLIC / "nectar_row0.jsonl").read_text())
    pairs, report = load_pairs(str(PUBLIC / "nectar_row0.jsonl"))
    assert report.layouts == {"nectar": 1} and len(pairs) == 21  # every ordered pair of 7 distinct ranks
    assert pairs[0].prompt == [{"role": "user", "content": "0.002 = 1000 \n1 = x?"}]
    best = row["answers"][0]["answer"]
    assert sum(p.chosen == best for p in pairs) == 6 and all(p.rejected != best for p in pairs)
    assert pairs[0].source == "nectar/sharegpt"


def test_real_ultrafeedback_record_and_rating_ranks():
    from rm.public_layouts import comparison_records, ultrafeedback_score

    row = json.loads((PUBLIC / "ultrafeedback_readme_record.jsonl").read_text())
    assert ultrafeedback_score(row["completions"][0]) == pytest.approx((2 + 3 + 3 + 3) / 4)
    with pytest.raises(DataError, match="1 left out: no comparison.*fewer than two rated completions"):
        load_pairs(str(PUBLIC / "ultrafeedback_readme_record.jsonl"), on_error="skip")  # one of four is published
    first = row["completions"][0]
    better = {**first, "response": "B", "fine-grained_score": 4.5}
    tied = {**first, "response": "C", "fine-grained_score": 2.75}
    unrated = {"response": "D", "annotations": {"helpfulness": {"Rating": "N/A"}}}
    (record,) = comparison_records({**row, "completions": [first, better, tied, unrated]}, "f:1")
    assert record["responses"] == [first["response"], "B", "C"] and record["ranking"] == [2, 1, 2]
    assert record["prompt"] == [{"role": "user", "content": row["instruction"]}]


def test_openassistant_trees_give_one_ranking_per_prompter_message():
    """A real prompt and its rank-0 reply (its siblings were not available; see SOURCES.md), then a written tree."""
    from rm.public_layouts import NoComparison, comparison_records

    real = json.loads((PUBLIC / "oasst1_monopsony_partial_tree.jsonl").read_text())
    with pytest.raises(NoComparison, match="f:1: no prompter message with two or more ranked replies"):
        comparison_records(real, "f:1")
    sibling = {"message_id": "x", "role": "assistant", "text": "Monopsony is one buyer.", "rank": 1, "replies": []}
    real["prompt"]["replies"].append(sibling)
    (record,) = comparison_records(real, "f:1")
    assert record["prompt"] == [{"role": "user", "content": real["prompt"]["text"]}]
    assert record["responses"][0].startswith('"Monopsony" refers to') and record["ranking"] == [1, 2]

    def node(role, text, rank=None, replies=()):
        return {"message_id": text, "role": role, "text": text, "rank": rank, "lang": "en", "replies": list(replies)}

    follow = node("prompter", "q2", replies=[node("assistant", "x", 1), node("assistant", "y", 0)])
    tree = {
        "message_tree_id": "t",
        "tree_state": "ready_for_export",
        "prompt": node("prompter", "q1", replies=[node("assistant", "a", 0, [follow]), node("assistant", "b", 1)]),
    }
    first, second = comparison_records(tree, "f:1")
    assert first["prompt"] == [{"role": "user", "content": "q1"}] and first["ranking"] == [1, 2]
    assert second["prompt"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    assert (second["responses"], second["ranking"]) == (["x", "y"], [2, 1])
    with pytest.raises(DataError, match="f:1: an OpenAssistant message row"):
        comparison_records({"message_id": "m", "parent_id": None, "message_tree_id": "t", "text": "hi"}, "f:1")
