"""Model FLOPs per token for gpt-oss, counting only what a token actually computes (its top-k experts).

Per token and layer, forward (a multiply-add = 2 FLOPs):
    projections   2 * (H*(Q + 2K) + Q*H)                    QKV and output projection (Q = heads*d, K = kv*d)
    router        2 * H*E
    experts       2 * k * (H*2I + I*H)                        the top-k experts only, never all E
    attention     4 * heads * d * c                           QK^T and AV over c attended positions
where c is the mean number of positions a query attends to: (s + 1) / 2 for full causal attention over a
sequence of s tokens, the same capped at the window for sliding layers. Plus the output layer 2 * H*V per token.
Training = 3 x forward (backward is twice the forward). Biases, norms, softmax and the routing top-k are left out
(< 0.1% at gpt-oss sizes). This is the "model FLOPs" of MFU: recomputation is not counted.
"""

from __future__ import annotations

from gptoss_nemo.model.hf_config import GptOssConfig


def mean_context(seq_length: int, window: int | None) -> float:
    """Mean over positions p = 0..s-1 of the positions attended, min(p + 1, window)."""
    s = seq_length
    if window is None or window >= s:
        return (s + 1) / 2
    w = window
    return (w * (w + 1) / 2 + (s - w) * w) / s


def forward_flops_per_token(cfg: GptOssConfig, seq_length: int) -> float:
    h, d, i, e, k = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_local_experts,
                     cfg.num_experts_per_tok)
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    dense = 2 * (h * (q + 2 * kv) + q * h) + 2 * h * e + 2 * k * (h * 2 * i + i * h)
    total = 0.0
    for sliding in cfg.sliding_layers:
        c = mean_context(seq_length, cfg.sliding_window if sliding else None)
        total += dense + 4 * cfg.num_attention_heads * d * c
    return total + 2 * h * cfg.vocab_size


def train_flops_per_token(cfg: GptOssConfig, seq_length: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_length)
