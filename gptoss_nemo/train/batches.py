"""Which sequences each data-parallel rank trains on at each step: deterministic from (seed, step), resumable.

Step t uses global batch t: `global_batch_size` sequences from a seeded permutation of the training set (a new
permutation per epoch). Data-parallel rank r takes sequences r, r + dp, r + 2 dp, ... of the global batch and cuts
them into micro-batches of `micro_batch_size`. The state to checkpoint is just the step: batch t is the same on a
resumed run as on an uninterrupted one, whatever the number of data-parallel ranks.
"""

from __future__ import annotations

import random

import torch

from gptoss_nemo.config.sft import check_batch_split
from gptoss_nemo.data.packing import Sequence
from gptoss_nemo.errors import ConfigError


class GlobalBatches:
    def __init__(self, sequences: list[Sequence], global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int):
        check_batch_split(global_batch_size, micro_batch_size, dp_size)
        if not sequences:
            raise ConfigError("no training sequences")
        self.seqs, self.gbs, self.mbs = sequences, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        # whether some sequence holds several documents (data.packing): TE's attention then runs THD (train/step.py)
        self.packs_documents = any(s.cu_seqlens.numel() > 2 for s in sequences)
        self._orders: dict[int, list[int]] = {}

    @property
    def num_microbatches(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.seqs)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # keep one epoch's permutation
        return self._orders[epoch]

    def global_indices(self, step: int) -> list[int]:
        n = len(self.seqs)
        out = []
        for k in range(step * self.gbs, (step + 1) * self.gbs):
            out.append(self._order(k // n)[k % n])
        return out

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        mine = self.global_indices(step)[self.dp_rank::self.dp_size]
        out = []
        for i in range(0, len(mine), self.mbs):
            group = [self.seqs[j] for j in mine[i:i + self.mbs]]
            out.append({name: torch.stack([getattr(s, name) for s in group])
                        for name in ("tokens", "labels", "loss_mask", "position_ids")})
        return out
