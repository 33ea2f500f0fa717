"""Fixed-length training sequences from tokenized conversations, packed or one per sequence.

A sequence holds whole conversations ("documents") back to back, then padding. For position j:
    tokens[j]      the input token
    labels[j]      tokens[j + 1], the target
    loss_mask[j]   1 when tokens[j + 1] is a loss token of the same document; never across a boundary
    position_ids   restart at 0 in every document, 0 on padding: where the documents begin
    cu_seqlens     document boundaries [0, n1, n1 + n2, ..., total]
Attention keeps the documents apart under model.impl=fused (document ids from the position ids, flex attention) and
model.impl=te (each micro-batch as one THD sequence with cu_seqlens from the position ids, cuDNN attention with
sinks; train/step.py), where cuDNN >= 9.26 has that attention's backward (packing under te is refused before).
Rotary embeddings are relative, so a document attended alone sees the same thing wherever it sits in the sequence.
Under model.impl=reference (megatron's own attention, the baseline) a token also attends to earlier documents of its
sequence; the loss and its targets never cross a boundary there either: use data.packing=false with it where that
matters.

Packing is first-fit over the open sequences, in the (seeded, shuffled) order given: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_OPEN = 64  # sequences still accepting documents; older ones are closed as they fall out


@dataclass(slots=True)
class Document:
    ids: list[int]
    loss: list[bool]


@dataclass(slots=True)
class Sequence:
    tokens: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [S] int64
    loss_mask: torch.Tensor  # [S] float32
    position_ids: torch.Tensor  # [S] int64
    cu_seqlens: torch.Tensor  # [docs + 1] int32


def fit(doc: Document, seq_length: int, overlong: str) -> tuple[Document | None, str]:
    """Apply the overlong rule (data.overlong: drop, truncate, error: the caller counts and reports):
    "kept" | "truncated" | "dropped_overlong" (longer than seq_length, or truncated to nothing to train on) |
    "dropped_no_loss" (fits, but has no loss token under data.loss_on)."""
    if len(doc.ids) > seq_length:
        if overlong != "truncate":
            return None, "dropped_overlong"
        doc = Document(doc.ids[:seq_length], doc.loss[:seq_length])
        return (doc, "truncated") if any(doc.loss[1:]) else (None, "dropped_overlong")
    if not any(doc.loss[1:]):  # the first token is never a target
        return None, "dropped_no_loss"
    return doc, "kept"


def pack(docs: list[Document], seq_length: int, pad_id: int, packing: bool = True) -> list[Sequence]:
    """Documents (each at most seq_length long) -> sequences of exactly seq_length positions."""
    bins: list[list[Document]] = []
    space: list[int] = []
    first_open = 0
    for doc in docs:
        n = len(doc.ids)
        target = None
        if packing:
            target = next((b for b in range(first_open, len(bins)) if space[b] >= n), None)
        if target is None:
            bins.append([])
            space.append(seq_length)
            target = len(bins) - 1
            first_open = max(first_open, len(bins) - MAX_OPEN)
        bins[target].append(doc)
        space[target] -= n
    return [_sequence(b, seq_length, pad_id) for b in bins]


def _sequence(docs: list[Document], seq_length: int, pad_id: int) -> Sequence:
    tokens = torch.full((seq_length,), pad_id, dtype=torch.int64)
    labels = torch.full((seq_length,), pad_id, dtype=torch.int64)
    loss = torch.zeros(seq_length, dtype=torch.float32)
    pos = torch.zeros(seq_length, dtype=torch.int64)
    bounds, at = [0], 0
    for d in docs:
        n = len(d.ids)
        ids = torch.tensor(d.ids, dtype=torch.int64)
        tokens[at:at + n] = ids
        labels[at:at + n - 1] = ids[1:]
        loss[at:at + n - 1] = torch.tensor(d.loss[1:], dtype=torch.float32)
        pos[at:at + n] = torch.arange(n)
        at += n
        bounds.append(at)
    return Sequence(tokens, labels, loss, pos, torch.tensor(bounds, dtype=torch.int32))
