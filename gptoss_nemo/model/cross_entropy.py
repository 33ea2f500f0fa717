"""The language-model loss of the fused local kernels: per-token cross entropy read from the BF16 logits once.

megatron's vocabulary-parallel cross entropy first copies the [s, b, V] logits to FP32 (6.6 GB at 4096 tokens and
gpt-oss's 201088-token vocabulary) and makes several elementwise passes over that copy each way: about 12 ms per
4096-token micro-batch on an H200, 15% of a gpt-oss-20b-shaped two-layer step (benchmarks/RESULTS.md). Here
torch.compile turns log-sum-exp minus the target logit into one reduction over the BF16 logits (FP32 arithmetic
inside), and its backward, softmax minus one-hot, into one pass that writes the BF16 gradient. Same loss, FP32
throughout; used with tensor parallelism 1 only (the vocabulary then is not split; with TP > 1 megatron's
vocabulary-parallel version runs).
"""

from __future__ import annotations

import torch

from gptoss_nemo.model.cuda_compile import compiled_on_cuda


@compiled_on_cuda(dynamic=False)
def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [..., V] (any float dtype), labels [...] -> per-token loss [...] in FP32."""
    x = logits.float()
    return torch.logsumexp(x, dim=-1) - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def language_model_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """megatron's `compute_language_model_loss` contract: labels [b, s], logits [s, b, V] -> loss [b, s]."""
    return token_cross_entropy(logits, labels.transpose(0, 1)).transpose(0, 1).contiguous()


def use_for(model) -> bool:
    """Give a GPTModel stage this loss when it runs the fused kernels with TP 1; returns whether it did."""
    config = model.config
    if config.impl != "fused" or config.tensor_model_parallel_size != 1:
        return False
    model.compute_language_model_loss = language_model_loss  # an instance attribute: GPTModel reads it per call
    return True
