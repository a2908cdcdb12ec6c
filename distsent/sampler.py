"""The global batch plan: which samples form each optimizer step, independent of how many processes train.

An epoch's order and its grouping into global batches depend only on (seed, epoch): the world size, the rank and
any loader settings never enter. Each global batch is then cut into world_size x accum_steps micro-batches, and
rank r takes micro-batches r, r + world_size, ... . A checkpoint only needs to record how many global batches of
the epoch are done; a resume on any number of processes continues with the next global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int, bucket_batches: int) -> list[np.ndarray]:
    """Sample indices of every global batch of `epoch`, every sample exactly once.

    Length-aware: the shuffled order is cut into pools of `bucket_batches` global batches, each pool is sorted by
    length and cut into batches, and the batch order is shuffled, so batches hold reviews of similar length (little
    padding) while staying random. Only the last batch of the epoch may be smaller.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = global_batch * bucket_batches
    if bucket_batches > 1:
        chunks = [order[i: i + pool] for i in range(0, len(order), pool)]
        # stable sort keeps the shuffled order among equal lengths, so the result depends on (seed, epoch) only
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])
    batches = [order[i: i + global_batch] for i in range(0, len(order), global_batch)]
    # shuffle the order of the full batches; the smaller last one stays last so every other batch has the full size
    full = len(order) // global_batch
    perm = rng.permutation(full)
    return [batches[i] for i in perm] + batches[full:]


def by_length(lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Evaluation and prediction batches: indices sorted by length (little padding); with `world_size` processes,
    process `rank`'s share, dealt in turn (equal counts, nearly equal tokens)."""
    mine = np.argsort(lengths, kind="stable")[rank::world_size]
    return [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]


@dataclass(frozen=True)
class Layout:
    """How a global batch maps onto processes: world_size x accum_steps micro-batches of micro_batch samples."""

    global_batch: int
    world_size: int
    accum_steps: int

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world_size * self.accum_steps)

    @classmethod
    def build(cls, global_batch: int, world_size: int, micro_batch_cap: int = 0) -> "Layout":
        """The layout for this world size, or a ValueError that lists the world sizes that divide the batch."""
        if global_batch % world_size:
            ok = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
            raise ValueError(f"train.global_batch_size={global_batch} cannot be split evenly over {world_size} "
                             f"processes; process counts that work: {', '.join(map(str, ok))}")
        per_rank = global_batch // world_size
        accum = 1
        if micro_batch_cap:
            while per_rank % accum or per_rank // accum > micro_batch_cap:
                accum += 1
        return cls(global_batch, world_size, accum)

    def micro_batches(self, batch: np.ndarray, rank: int) -> list[np.ndarray]:
        """This rank's accum_steps micro-batches of one global batch (possibly empty for a short last batch)."""
        # strided, not contiguous: a batch is sorted by length, so striding gives every rank the same mix of lengths
        n = self.world_size * self.accum_steps
        return [batch[m * self.world_size + rank:: n] for m in range(self.accum_steps)]
