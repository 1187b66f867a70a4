"""Deterministic, resumable order of training rows over ranks and epochs, and held-out splits."""

from __future__ import annotations

import random

from align.core.records import DataError


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class MicroBatches:
    """Deterministic micro-batch order: a fresh permutation per epoch from (seed, epoch); rank r takes every
    world-th micro-batch slice. Position is the number of global micro-batches consumed, so resuming is exact."""

    def __init__(self, rows: list, micro_batch_size: int, rank: int, world: int, seed: int) -> None:
        self.rows, self.mb, self.rank, self.world, self.seed = rows, micro_batch_size, rank, world, seed
        self.per_epoch = len(rows) // (micro_batch_size * world)
        if self.per_epoch == 0:
            raise DataError(
                f"{len(rows)} rows are fewer than one global micro-batch ({micro_batch_size} x {world} ranks)"
            )
        self._epoch, self._order = -1, []

    def get(self, position: int) -> list:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._order = list(range(len(self.rows)))
            random.Random(self.seed * 100_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        start = (index * self.world + self.rank) * self.mb
        return [self.rows[i] for i in self._order[start : start + self.mb]]
