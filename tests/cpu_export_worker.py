"""Worker for test_vllm_export.py: `gptoss-nemo export`'s writer (convert/hf_export.py `export_hf`) on the CPU, a
world of one on gloo, from the tiny gpt-oss as a megatron GPTModel (checkpoint_keys_worker.py builds it), its
weights loaded from a Hugging Face tiny checkpoint as `gptoss-nemo import` loads them.

    python cpu_export_worker.py HF_DIR PORT [--trained SEED] FORMAT=OUT_DIR [FORMAT=OUT_DIR ...]

--trained moves every expert weight off the MXFP4 grid, as a QAT optimizer step does (w * (1 + 0.3 u), u uniform
in [0, 1), then rounded to BF16). This stands in for a QAT checkpoint: ModelOpt's FP4 fake quant runs only on CUDA,
so on the CPU the model is not wrapped in ModelOpt's MXFP4 quantizers and was never trained. The MXFP4 export's own
codec (checkpoint/mxfp4.py: E8M0 scale per 32, E2M1 ties to even, flush-to-zero) rounds the weights instead, which
is what the export of a QAT checkpoint holds too: the codec is checked against ModelOpt's MXFP4 fake quant on a GPU
(tests/gpu/test_qat_gpu.py), and rounding an already fake-quantized weight again changes nothing. So what vLLM is
tested on is the writer's MXFP4 output (packing, scale layout, quantization_config) of off-grid weights, not of
weights ModelOpt trained. `nvfp4` quantizes the model with ModelOpt's NVFP4 preset
first (its weight scales are computed on the CPU) and writes ModelOpt's NVFP4 layout; it must come last. Prints one
JSON line: {format: out_dir}.
"""

import json
import sys

import torch
import torch.distributed as dist


def main(src: str, port: str, trained: int | None, targets: list[tuple[str, str]]) -> None:
    from checkpoint_keys_worker import build, cpu_megatron

    cpu_megatron(port)
    from gptoss_nemo.convert.hf_export import export_hf
    from gptoss_nemo.convert.hf_reader import HFReader
    from gptoss_nemo.convert.hf_to_megatron import iter_rank_state, load_rank_state
    from gptoss_nemo.parallel.layout import ParallelLayout
    from gptoss_nemo.quantize import modelopt_state

    reader = HFReader(src)
    model = build(reader.cfg, "reference", 0)
    layout = ParallelLayout()
    load_rank_state(model, iter_rank_state(reader, layout, tp_rank=0, ep_rank=0, pp_rank=0))
    if trained is not None:
        g = torch.Generator().manual_seed(trained)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp.experts." in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g)).copy_(p.bfloat16())
    written = {}
    for fmt, out in targets:
        if fmt == "nvfp4":
            modelopt_state.quantize(model, "nvfp4")
        written[fmt] = str(export_hf(model, reader.cfg, layout, out, fmt=fmt, side_files_from=src))
    print(json.dumps(written))
    dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    seed = None
    if "--trained" in args:
        i = args.index("--trained")
        seed = int(args.pop(i + 1))
        args.pop(i)
    main(args[0], args[1], seed, [tuple(a.split("=", 1)) for a in args[2:]])
