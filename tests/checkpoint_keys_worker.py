"""Worker for test_checkpoint_keys.py (run as a script: megatron's checkpoint writer spawns processes, which
re-import __main__). A world of one on gloo, the CPU: the tiny gpt-oss as megatron's local-spec GPTModel under one
implementation, saved with save_dist_checkpoint (optionally quantized), loaded with load_dist_checkpoint into a
model of another implementation; prints one JSON line: parameters equal, quantizers equal.

    python checkpoint_keys_worker.py SRC_IMPL DST_IMPL OUT PORT [--old-keys] [--quant FORMAT]

--old-keys writes the checkpoint as the local spec did before compat.py's moe_local_checkpoint_keys (the pre-MLP
norm under megatron's dense-MLP key). CPU stand-ins, nothing else changed: megatron's YaRN cache and checkpoint
finalize call torch.cuda.current_device() / synchronize(), its MoE dispatcher makes a CUDA stream."""

import json
import os
import sys

import torch
import torch.distributed as dist


def cpu_megatron(port: str) -> None:
    """A world of one on gloo with megatron's parallel state and this package's workarounds, and the CPU stand-ins
    for the CUDA calls megatron makes (the YaRN cache, checkpoint finalize, the MoE dispatcher's stream)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    from gptoss_nemo.compat import apply_megatron_patches

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    apply_megatron_patches()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = lambda *a, **k: None


def build(hf, impl: str, seed: int):
    from megatron.core.models.gpt import GPTModel

    from gptoss_nemo.model.build import layer_spec, transformer_config
    from gptoss_nemo.parallel.layout import ParallelLayout

    torch.manual_seed(seed)
    config = transformer_config(hf, None, impl, use_cpu_initialization=True,
                                **ParallelLayout().megatron_overrides(False))
    model = GPTModel(config=config, transformer_layer_spec=layer_spec(config), vocab_size=hf.vocab_size,
                     max_sequence_length=hf.max_position_embeddings, pre_process=True, post_process=True,
                     share_embeddings_and_output_weights=False, position_embedding_type="yarn",
                     rotary_base=int(hf.rope.theta))
    with torch.no_grad():
        for p in model.parameters():  # BF16 values, as in every checkpoint (HF BF16 weights, Float16Module)
            p.copy_(torch.randn(p.shape).bfloat16())
    return model


def quantizers(model) -> list:
    from gptoss_nemo.quantize.modelopt_state import _members, expert_weight_quantizers

    return [(name, str(q.num_bits), str(q.block_sizes), q.is_enabled, None if q.amax is None else float(q.amax.max()))
            for name, module in expert_weight_quantizers(model) for q in _members(module.weight_quantizer)]


def main(src_impl: str, dst_impl: str, out: str, port: str, old_keys: bool, quant: str | None) -> None:
    cpu_megatron(port)
    from gptoss_nemo.convert.dist_checkpoint import load_dist_checkpoint, save_dist_checkpoint
    from gptoss_nemo.model.presets import tiny
    from gptoss_nemo.parallel.layout import ParallelLayout

    hf = tiny()
    src = build(hf, src_impl, 1)
    if old_keys:
        for layer in src.decoder.layers:
            layer.submodules_config.sharded_state_dict_keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    extra = None
    if quant:
        from gptoss_nemo.quantize import modelopt_state

        modelopt_state.quantize(src, quant)
        extra = {"quant": {"format": quant, "stage": "ptq"}}
    save_dist_checkpoint(src, out, hf, layout=ParallelLayout(), source="test", side_files_from=None, extra=extra)
    dst = build(hf, dst_impl, 2)
    load_dist_checkpoint(dst, out)
    a, b = dict(src.named_parameters()), dict(dst.named_parameters())
    equal = sum(torch.equal(a[k], b[k]) for k in a if k in b)
    print(json.dumps({"params": len(a), "same_names": set(a) == set(b), "equal": equal,
                      "quantizers_equal": quantizers(src) == quantizers(dst), "quantizers": len(quantizers(dst)),
                      "meta": json.loads(open(os.path.join(out, "gptoss_nemo.json")).read())}))


if __name__ == "__main__":
    args = sys.argv[1:]
    quant = args[args.index("--quant") + 1] if "--quant" in args else None
    main(*args[:4], old_keys="--old-keys" in args, quant=quant)
