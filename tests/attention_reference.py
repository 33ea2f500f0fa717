"""gpt-oss attention by its definition, in float64: the CPU and GPU tests' reference for the fused kernels."""

import torch


def dense_sink_attention(q, k, v, sinks, scale, window, doc=None):
    """The definition: softmax over [scores of visible keys, sink], the sink's share dropped."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    i = torch.arange(q.shape[2], device=q.device)
    keep = i[:, None] >= i[None, :]
    if window is not None:
        keep = keep & (i[:, None] - i[None, :] <= window)
    keep = keep[None, None] if doc is None else keep[None, None] & (doc[:, None, :, None] == doc[:, None, None, :])
    s = s.masked_fill(~keep, float("-inf"))
    sink = sinks.double()[None, :, None, None].expand(*s.shape[:3], 1)
    p = torch.cat([s, sink], -1).softmax(-1)[..., :-1]
    return (p @ v.double()).to(q.dtype)
