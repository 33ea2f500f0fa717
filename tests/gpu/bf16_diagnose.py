"""Where TE's BF16 model departs from the FP32 truth, module by module, beside the fused local kernels' BF16 model
(issue 21). Not a test: run as a script on one GPU with NVIDIA_TF32_OVERRIDE=0 (FP32 GEMMs exact).

    python tests/gpu/bf16_diagnose.py [--layers 3 --experts 16 --seq 2048 --batch 2]   (gpt-oss-20b widths)

The same random weights (megatron's init, FP32) go into three models: fused FP32 (the truth), fused BF16 and TE BF16.
Forward hooks record each layer's module outputs; printed: the relative error ||x - truth|| / ||truth|| of each, per
implementation, then the logits' cosine and top-1 against the truth. Errors accumulate from layer to layer, so the
first module where TE's error exceeds fused's is where to look."""

import argparse
import json
import os
import re

import torch
import torch.distributed as dist

MODULES = ["self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
           "pre_mlp_layernorm", "mlp.router", "mlp.experts", "mlp", ""]


def canonical(name: str) -> str:
    """A parameter's name in the local spec's terms (TE fuses the input norm into QKV and groups the experts)."""
    name = name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
    m = re.match(r"(.*)\.mlp\.experts\.(linear_fc\d)\.(weight|bias)(\d+)$", name)
    return f"{m[1]}.mlp.experts.local_experts.{m[4]}.{m[2]}.{m[3]}" if m else name


def first_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def run(model, ids, pos):
    seen = {}
    hooks = []
    for i, layer in enumerate(model.decoder.layers):
        for suffix in MODULES:
            module = layer.get_submodule(suffix) if suffix else layer
            key = f"{i}.{suffix or 'layer'}"
            hooks.append(module.register_forward_hook(
                lambda m, a, o, key=key: seen.__setitem__(key, first_tensor(o).detach().float().clone())))
    with torch.no_grad():
        logits = model(ids, pos, attention_mask=None).float()
    for h in hooks:
        h.remove()
    return seen, logits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29771")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from gptoss_nemo.model.build import build_model, transformer_config
    from gptoss_nemo.model.presets import gpt_oss_20b

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    hf = gpt_oss_20b().replace(num_hidden_layers=args.layers, num_local_experts=args.experts, quantized=False,
                               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                            for i in range(args.layers)])
    models = {}
    for name, impl, dtype in (("truth", "fused", torch.float32), ("fused", "fused", torch.bfloat16),
                              ("te", "te", torch.bfloat16)):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(1234)
        models[name] = build_model(hf, transformer_config(hf, None, impl, params_dtype=dtype,
                                                          bf16=dtype == torch.bfloat16)).eval()
    truth = {canonical(n): q for n, q in models["truth"].named_parameters()}
    with torch.no_grad():
        for q in truth.values():  # BF16-representable weights: the three models hold the same values
            q.copy_(q.bfloat16().float())
        for name in ("fused", "te"):
            for n, q in models[name].named_parameters():
                q.copy_(truth[canonical(n)])
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, hf.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
    pos = torch.arange(args.seq, device="cuda").expand(args.batch, -1)
    outs = {name: run(m, ids, pos) for name, m in models.items()}
    ref_seen, ref_logits = outs["truth"]
    report = {"shape": vars(args), "modules": {}, "logits": {}}
    for key, ref in ref_seen.items():
        row = {}
        for name in ("fused", "te"):
            x = outs[name][0].get(key)
            row[name] = None if x is None or x.shape != ref.shape else round(
                ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item(), 6)
        report["modules"][key] = row
    for name in ("fused", "te"):
        logits = outs[name][1]
        cos = torch.nn.functional.cosine_similarity(logits.flatten(1).double(), ref_logits.flatten(1).double(), dim=1)
        report["logits"][name] = {"min_cos": cos.min().item(),
                                  "top1": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()}
    print("RESULT bf16 error by module (relative to the FP32 truth): " + json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
