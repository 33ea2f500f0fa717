"""Where a training forward without grad (what megatron's recompute runs first) stops being bitwise the forward with
grad (what it repeats in the backward): the thirteenth session's recompute difference under model.impl=te and
=reference (tests/gpu/RESULTS.md); run with GPTOSS_NEMO_SKIP_PATCHES=moe_topk_sorted_without_grad to see it again
(compat.py 15). One GPU, the tiny model, deterministic kernels; prints, per module in call order,
whether its output is bitwise equal in both modes, and the first that is not.

    python tests/gpu/recompute_diagnose.py te|reference|fused
"""

from __future__ import annotations

import os
import sys

import torch


def main(impl: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from gptoss_nemo.model.build import build_model, transformer_config
    from gptoss_nemo.model.megatron_config import RouterConfig
    from gptoss_nemo.model.presets import tiny

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29761")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    hf = tiny()
    torch.manual_seed(0)
    model = build_model(hf, transformer_config(hf, RouterConfig(), impl=impl, deterministic_mode=True)).train()
    seen: dict[str, list] = {}

    def hook(name):
        def record(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(first):
                seen.setdefault(name, []).append(first.detach().clone())
        return record

    for name, module in model.named_modules():
        if name.startswith("decoder.layers."):
            module.register_forward_hook(hook(name))
    g = torch.Generator(device="cuda").manual_seed(7)
    ids = torch.randint(0, hf.vocab_size, (2, 513), device="cuda", generator=g)
    pos = torch.arange(512, device="cuda").expand(2, -1)
    with torch.no_grad():
        model(ids[:, :-1], pos, attention_mask=None)
    model(ids[:, :-1], pos, attention_mask=None)
    first_bad = None
    for name, (a, b) in ((n, v) for n, v in seen.items() if len(v) == 2):
        same = a.shape == b.shape and torch.equal(a, b)
        print(f"{'equal' if same else 'DIFFERENT':9s} {name} {tuple(a.shape)}"
              + ("" if same or a.shape != b.shape else f" max |d| {(a.float() - b.float()).abs().max().item():.3e}"))
        if not same and first_bad is None:
            first_bad = name
    from gptoss_nemo.compat import apply_megatron_patches

    print(f"RESULT no-grad vs grad training forward, impl={impl}: first module that differs: {first_bad} "
          f"(workarounds in effect: {', '.join(apply_megatron_patches())})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "te")
