"""Logits of the megatron model (any TP x PP layout, full vocabulary) and how two sets of logits compare: used by
`gptoss-nemo verify-export` and the GPU parity tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] on the last pipeline stage (model built with parallel_output=False);
    None on other stages. Stages hand activations on with plain send/recv."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    model.eval()
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            shape = torch.empty(3, dtype=torch.int64, device=ids.device)
            dist.recv(shape, ps.get_pipeline_model_parallel_prev_rank())
            dtype = model.config.params_dtype
            hidden = torch.empty(shape.tolist(), dtype=dtype, device=ids.device)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, pos, attention_mask=None)
        if not ps.is_pipeline_last_stage():
            out = out.to(model.config.params_dtype).contiguous()  # as megatron's pipeline_dtype does
            dist.send(torch.tensor(out.shape, device=ids.device), ps.get_pipeline_model_parallel_next_rank())
            dist.send(out, ps.get_pipeline_model_parallel_next_rank())
            return None
    return out


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Cosine similarity of each sequence's logits (flattened) and top-1 agreement over all positions."""
    assert ref.shape == got.shape, (ref.shape, got.shape)
    cos = [F.cosine_similarity(r.double().flatten(), g.double().flatten(), dim=0).item() for r, g in zip(ref, got)]
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return {"cos_per_sequence": cos, "min_cos": min(cos), "top1": top1}
