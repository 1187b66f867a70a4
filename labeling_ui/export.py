"""Several annotations of one item merged into one comparison record (the format `align rm train` reads)."""

from __future__ import annotations

from itertools import combinations
from typing import Literal

from align.core.records import ComparisonRecord

Rule = Literal["majority", "ranked_pairs"]


def pair_votes(rankings: list[list[int]], k: int) -> dict[tuple[int, int], int]:
    """votes[(i, j)] = annotators who ranked response i above j (1 = best)."""
    votes = {(i, j): 0 for i in range(k) for j in range(k) if i != j}
    for ranks in rankings:
        for i, j in combinations(range(k), 2):
            if ranks[i] < ranks[j]:
                votes[(i, j)] += 1
            elif ranks[j] < ranks[i]:
                votes[(j, i)] += 1
    return votes


def merge_rankings(rankings: list[list[int]], rule: Rule = "majority") -> list[int]:
    """One ranking (ties allowed) from several.

    majority: a response's rank follows the number of pairwise majorities it wins (Copeland); equal scores tie.
    ranked_pairs: Tideman's method — lock pairwise majorities from strongest down unless they close a cycle, then
    rank by the locked graph; responses that no locked pair separates tie."""
    k = len(rankings[0])
    votes = pair_votes(rankings, k)
    if rule == "majority":
        wins = [sum(1 for j in range(k) if j != i and votes[(i, j)] > votes[(j, i)]) for i in range(k)]
        order = sorted(set(wins), reverse=True)
        return [order.index(w) + 1 for w in wins]
    margins = sorted(
        (
            (votes[(i, j)] - votes[(j, i)], i, j)
            for i in range(k)
            for j in range(k)
            if i != j and votes[(i, j)] > votes[(j, i)]
        ),
        key=lambda x: (-x[0], x[1], x[2]),
    )
    locked: set[tuple[int, int]] = set()

    def reaches(a: int, b: int) -> bool:
        stack, seen = [a], {a}
        while stack:
            x = stack.pop()
            if x == b:
                return True
            for u, v in locked:
                if u == x and v not in seen:
                    seen.add(v)
                    stack.append(v)
        return False

    for _, i, j in margins:
        if not reaches(j, i):
            locked.add((i, j))
    depth = [len({u for u in range(k) if u != i and reaches(u, i)}) for i in range(k)]
    levels = sorted(set(depth))
    return [levels.index(d) + 1 for d in depth]


def comparison_record(task, annotations: list[tuple[object, str]], rule: Rule = "majority") -> dict | None:
    """The merged record of one task, or None when nobody ranked it."""
    ranked = [(a, name) for a, name in annotations if a.ranks is not None and not a.skipped]
    if not ranked:
        return None
    ranking = merge_rankings([a.ranks for a, _ in ranked], rule)
    strengths = [a.strength for a, _ in ranked if a.strength is not None]
    tags = sorted({t for a, _ in ranked for t in (a.tags or [])} | set(task.tags or []))
    return ComparisonRecord(
        task.prompt,
        task.responses,
        ranking,
        sum(strengths) / len(strengths) if strengths else None,
        tags,
        ",".join(name for _, name in ranked),
        "human",
        {
            "annotators": [name for _, name in ranked],
            "individual_rankings": [a.ranks for a, _ in ranked],
            "all_bad": any(a.all_bad for a, _ in ranked),
            "unsafe": [a.unsafe for a, _ in ranked if a.unsafe],
            "task_id": task.id,
            **({"meta": task.meta} if task.meta else {}),  # what the import carried (e.g. safety labels)
        },
    ).to_dict()
