"""Batches from the packed shards, in an order fixed by (seed, epoch), addressed by a single counter —
so resuming at micro-step k needs no replay of the data before it, and every process of a multi-GPU
run takes its own disjoint slice."""

from __future__ import annotations

import torch

from codetune.data.shards import PackedDataset


class BatchStream:
    def __init__(self, ds: PackedDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(ds) < batch_size * world:
            raise ValueError(f"{ds.dir} holds {len(ds)} sequences, fewer than one batch "
                             f"({batch_size} x {world} processes): prepare more data or lower --batch-size/--seq-len")
        self.ds, self.bs, self.seed, self.rank, self.world = ds, batch_size, seed, rank, world
        self.per_epoch = len(ds) // (batch_size * world)
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.ds), generator=g), epoch
        return self._perm

    def batch(self, k: int) -> dict:
        """Micro-batch number k (0-based, counted over the whole run) for this process."""
        epoch, j = divmod(k, self.per_epoch)
        order = self._order(epoch)
        start = (j * self.world + self.rank) * self.bs
        items = [self.ds[int(i)] for i in order[start:start + self.bs]]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}


def eval_batches(ds: PackedDataset, batch_size: int, n: int, rank: int = 0, world: int = 1):
    """The first n validation batches, always the same ones, so evaluations are comparable."""
    total = min(len(ds), n * batch_size * world)
    for start in range(rank * batch_size, total, batch_size * world):
        items = [ds[i] for i in range(start, min(start + batch_size, total))]
        if items:
            yield {key: torch.stack([it[key] for it in items]) for key in items[0]}
