"""gpt-oss core attention on PyTorch flex attention: the fused path without Transformer Engine.

It stands in for megatron's `DotProductAttention` in the local spec (`model/build.py`, model.impl=fused) and keeps
its interface, its parameter (`softmax_offset`, the per-head sink, sharded over tensor-parallel ranks like the
heads) and so its checkpoint keys. megatron's local attention builds the [b, heads, s, s] score matrix in memory;
flex attention generates one fused kernel per mask and never materialises it.

  sinks     gpt-oss adds one learned logit per head to the softmax denominator. Flex attention returns the
            log-sum-exp L of each query's scores (natural log, differentiable), and with the sink s
                out_with_sink = out * exp(L) / (exp(L) + exp(s)) = out * sigmoid(L - s)
            so the sink costs one elementwise product, gradients included (through L and s).
  window    megatron's window_size=(w, 0) lets query i see keys i-w..i (gpt-oss: w = 127, 128 keys).
  documents when the model's `attention_mask` is an integer tensor [b, s] of document ids (`document_ids`, built
            by the training step from the position ids, which restart at 0 in each packed document), a query sees
            only keys of its own document, so packed conversations stay apart; `attention_mask=None` is one
            document per sequence. A plain tensor, so megatron's activation recompute (train.recompute), which
            passes the mask through torch's save_for_backward, carries it like any input.

Block masks are built once per (mask, shape) and reused: for `None` in a process-wide cache; for document ids in
a small cache keyed by the ids' storage and version (`_document_block_mask`), so every layer of a micro-batch, and
its recomputation in the backward (which sees a detached alias of the same storage), share them. The kernel is
`torch.compile(flex_attention)`, compiled on first use per shape (tens of seconds once). On the CPU the uncompiled
path runs (forward only: flex attention has no CPU backward), which is what the CPU tests use.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from gptoss_nemo.errors import ConfigError
from gptoss_nemo.model.cuda_compile import compiled_on_cuda

BLOCK = 128  # flex attention's default block size


# One compiled kernel per (window or not, documents or not, shape).
_flex_attention = compiled_on_cuda(dynamic=False)(flex_attention)


def _mask_mod(window: int | None, doc: Tensor | None):
    def mask(b, h, q, kv):
        keep = q >= kv
        if window is not None:
            keep = keep & (q - kv <= window)
        if doc is not None:
            keep = keep & (doc[b, q] == doc[b, kv])
        return keep

    return mask


def _block_mask(window: int | None, doc: Tensor | None, batch: int, q_len: int, kv_len: int, device):
    return create_block_mask(_mask_mod(window, doc), batch if doc is not None else None, None, q_len, kv_len,
                             device=device, BLOCK_SIZE=BLOCK)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(window: int | None, q_len: int, kv_len: int, device: torch.device):
    return _block_mask(window, None, 1, q_len, kv_len, device)


def document_ids(position_ids: Tensor) -> Tensor:
    """[b, s] int32 document ids from position ids, which restart at 0 in every document (data/packing.py): each
    restart opens a new document."""
    if position_ids.dim() != 2:
        raise ValueError(f"position ids must be [batch, seq], got {tuple(position_ids.shape)}")
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1, dtype=torch.int32)


_DOC_MASKS: OrderedDict = OrderedDict()
_DOC_MASKS_KEPT = 64  # micro-batches in flight (1F1B keeps PP of them) x windows, with room to spare


def _document_block_mask(ids: Tensor, window: int | None, q_len: int, kv_len: int):
    """The block mask of `ids` [b, s], built once per (storage, version, shape, window). Each entry keeps its ids
    tensor alive, so its storage cannot be reused by another micro-batch's ids while the entry exists."""
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ConfigError(f"the fused local attention takes attention_mask=None (causal) or integer document ids "
                          f"[batch, seq] (document_ids), not a {ids.dtype} tensor of shape {tuple(ids.shape)}")
    key = (ids.data_ptr(), ids._version, tuple(ids.shape), ids.stride(), ids.device, window, q_len, kv_len)
    hit = _DOC_MASKS.get(key)
    if hit is not None:
        _DOC_MASKS.move_to_end(key)
        return hit[1]
    mask = _block_mask(window, ids, ids.shape[0], q_len, kv_len, ids.device)
    _DOC_MASKS[key] = (ids, mask)
    while len(_DOC_MASKS) > _DOC_MASKS_KEPT:
        _DOC_MASKS.popitem(last=False)
    return mask


def sink_attention(query: Tensor, key: Tensor, value: Tensor, sinks: Tensor | None, scale: float,
                   window: int | None, documents: Tensor | None = None) -> Tensor:
    """query [b, heads, s, d], key/value [b, groups, s, d] (grouped-query), sinks [heads] or None, documents
    [b, s] document ids or None -> [b, heads, s, d]: causal (optionally windowed, document-separated) softmax
    attention with sinks."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if documents is None:
        mask = _causal_block_mask(window, q_len, kv_len, query.device)
    else:
        mask = _document_block_mask(documents, window, q_len, kv_len)
    out, aux = _flex_attention(query, key, value, block_mask=mask, scale=scale,
                               enable_gqa=query.shape[1] != key.shape[1], return_aux=AuxRequest(lse=True))
    if sinks is None:
        return out
    weight = torch.sigmoid(aux.lse - sinks.float()[None, :, None])  # [b, heads, s], FP32
    return (out.float() * weight.unsqueeze(-1)).to(out.dtype)


class FlexSinkAttention(DotProductAttention):
    """megatron's `DotProductAttention` (local spec) with the forward on flex attention: the same constructor,
    parameter (`softmax_offset`), scale, window and head split, so the same checkpoint keys and sharding."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ConfigError(f"attention_dropout={dropout}: the fused gpt-oss attention has no dropout (gpt-oss "
                              "trains with 0); use model.impl=reference for attention dropout")
        if config.apply_query_key_layer_scaling:  # megatron folds 1/layer into the scale and undoes it in its softmax
            raise ConfigError("apply_query_key_layer_scaling is not supported by the fused attention (gpt-oss does "
                              "not use it); use model.impl=reference")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        window = self.scale_mask_softmax.window_size
        if window is not None and window[1] != 0:
            raise ConfigError(f"window_size={window}: gpt-oss windows look back only, (w, 0)")
        self.window = None if window is None else int(window[0])

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> Tensor:
        """query [sq, b, heads, d], key/value [sk, b, groups, d] -> [sq, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ConfigError("the fused local attention takes packed documents as document ids (attention_mask), "
                              "not packed_seq_params or an attention bias")
        sq, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))  # [b, heads, s, d]
        out = sink_attention(q, k, v, self.softmax_offset, self.softmax_scale, self.window, attention_mask)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
