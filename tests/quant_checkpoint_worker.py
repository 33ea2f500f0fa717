"""Worker for test_quant_checkpoint.py (run as a script: megatron's checkpoint writer spawns processes, which
re-import __main__). A world of one on gloo, the CPU: megatron SequentialMLP experts as in gpt-oss layer 0,
quantized with ModelOpt, saved with save_dist_checkpoint, loaded into a fresh model with load_dist_checkpoint.

Two CPU stand-ins, nothing else changed: megatron's checkpoint finalize and ModelOpt's extra-state getter call
torch.cuda.current_device() / torch.cuda.synchronize(), which need a GPU."""

import json
import os
import sys

import torch
import torch.distributed as dist


def build(cfg):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from gptoss_nemo.model.build import transformer_config
    from gptoss_nemo.parallel.layout import ParallelLayout

    config = transformer_config(cfg, None, "reference", use_cpu_initialization=True,
                                **ParallelLayout().megatron_overrides(False))

    class Layer0Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config  # what a checkpoint's metadata reads ("impl")
            self.decoder = torch.nn.Module()
            self.decoder.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.decoder.layers[0].mlp = torch.nn.Module()
            self.decoder.layers[0].mlp.experts = SequentialMLP(
                cfg.num_local_experts, config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                             linear_fc2=RowParallelLinear),
                pg_collection=ProcessGroupCollection.use_mpu_process_groups())

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return self.decoder.layers[0].mlp.experts.sharded_state_dict(
                prefix + "decoder.layers.0.mlp.experts.", sharded_offsets, metadata)

    return Layer0Experts()


def main(fmt: str, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    from gptoss_nemo.compat import apply_megatron_patches
    from gptoss_nemo.convert.dist_checkpoint import load_dist_checkpoint, save_dist_checkpoint
    from gptoss_nemo.model.presets import tiny
    from gptoss_nemo.parallel.layout import ParallelLayout
    from gptoss_nemo.quantize import modelopt_state

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1, expert_tensor_parallel_size=1)
    apply_megatron_patches()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    cfg = tiny(layers=1, experts=4, top_k=2)
    model = build(cfg)
    modelopt_state.quantize(model, fmt, None)
    save_dist_checkpoint(model, out, cfg, layout=ParallelLayout(), source="test",
                         extra={"quant": {"format": fmt, "stage": "ptq"}})
    fresh = build(cfg)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_dist_checkpoint(fresh, out)

    def quantizers(m):
        return {n: mod.weight_quantizer for n, mod in modelopt_state.expert_weight_quantizers(m)}

    a, b = quantizers(model), quantizers(fresh)
    amax = {n: [getattr(a[n], "amax", None), getattr(b[n], "amax", None)] for n in a}
    print(json.dumps({
        "quantized": modelopt_state.is_quantized(fresh), "experts": sorted(b), "expected": sorted(a),
        "weights_equal": all(torch.equal(x, y) for x, y in zip(model.parameters(), fresh.parameters())),
        "quantizers_equal": all(str(a[n]) == str(b[n]) for n in a),
        "amax_equal": all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                          for x, y in amax.values()),
        "has_amax": any(x is not None for x, _ in amax.values()),
        # NVFP4: one per-tensor scale per projection, shared by the experts (fc1 and fc2 each have one value)
        "amax_values": {proj: sorted({float(x) for n, (x, _) in amax.items() if n.endswith(proj) and x is not None})
                        for proj in ("linear_fc1", "linear_fc2")},
        "files": sorted(os.listdir(out))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
