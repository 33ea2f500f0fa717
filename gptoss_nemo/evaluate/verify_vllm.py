"""`gptoss-nemo verify-export OUT_DIR --engine vllm [--against CKPT]`: does vLLM serve the export as transformers
computes it (and, with --against, as the megatron checkpoint does)?

Whatever vLLM is installed (GPU or CPU build; evaluate/vllm_engine.py finds it) loads the export with its own
gpt-oss loader, in `--dtype`, and (1) continues the prompts of held-out harmony conversations greedily
(`--max-new-tokens`; the conversations of `--data`, up to their last assistant message) and (2) scores the same
conversations packed into `--seq-length`-token sequences teacher-forced (prompt logprobs). transformers runs the
export on the same tokens and evaluate/engine_agreement.py's rule judges the two: exact for an unquantized export
served in FP32 (transformers in FP32); otherwise the near-tie rule, calibrated: against transformers' FP32, the
engine's teacher-forced statistics within 2x of what transformers' own BF16 does against its FP32, tokens agreeing
beyond the margin, the first generated token's logprob within 0.05 (greedy steps reported). Without --against it
checks that vLLM reads and computes the export as transformers does, not that the export is the checkpoint. With
`--against`, the
megatron checkpoint's logits on the same sequences (verify_export.py, GPUs: launched like every stage) are a second
reference for the teacher-forced positions, under the near-tie rule, and the megatron-vs-transformers comparison of
plain `verify-export` is printed beside it.

Checks before any engine starts: the export is a gpt-oss HF checkpoint with a tokenizer, vLLM is there, the data
reads; with --against also the checkpoint (same architecture) and a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptoss_nemo.errors import CheckpointError, DeviceError


def held_out_inputs(out_dir: str | Path, data: list[str], samples: int,
                    seq_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(harmony prompts of the first `samples` conversations, up to `samples` packed `seq_length`-token sequences)."""
    from transformers import AutoTokenizer

    from gptoss_nemo.evaluate.generate import prompt_text
    from gptoss_nemo.evaluate.hf_eval import check_records
    from gptoss_nemo.evaluate.verify_export import sequences

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    prompts = [tokenizer(prompt_text(conv), add_special_tokens=False).input_ids
               for _, _, conv in check_records(data, samples)]
    return prompts, sequences(out_dir, data, samples, seq_length).tolist()


def verify_with_vllm(out_dir: str | Path, *, data: list[str], samples: int = 8, seq_length: int = 512,
                     max_new_tokens: int = 16, dtype: str = "bfloat16", against: str | Path | None = None,
                     layout=None, impl: str = "auto", floor: bool = True, router_dtype: str = "fp32") -> dict | None:
    """The comparison on rank 0 (None on other ranks of an --against run)."""
    from gptoss_nemo.checkpoint.hf_layout import check_checkpoint
    from gptoss_nemo.evaluate.engine_agreement import NEAR_TIE, compare, rule_for
    from gptoss_nemo.evaluate.engine_reference import (
        fp32_reference_and_noise,
        positions,
        teacher_forced_positions,
        transformers_logits,
    )
    from gptoss_nemo.evaluate.vllm_engine import find_vllm_python, serve

    cfg = check_checkpoint(out_dir)
    if not (Path(out_dir) / "tokenizer.json").is_file():
        raise CheckpointError(f"{out_dir}: no tokenizer.json; verification renders the --data conversations with it")
    python = find_vllm_python()
    prompts, seqs = held_out_inputs(out_dir, data, samples, seq_length)
    megatron = None
    if against is not None:
        from gptoss_nemo.evaluate.verify_export import check_pair, verify_export

        check_pair(out_dir, against)
        if not torch.cuda.is_available():
            raise DeviceError("verify-export --against runs the megatron checkpoint, which needs CUDA GPUs, and none "
                              "is visible here: run it on a GPU node, or leave out --against to check vLLM against "
                              "transformers only")
        megatron = verify_export(out_dir, against, layout, data=data, samples=samples, seq_length=seq_length,
                                 impl=impl, floor=floor, router_dtype=router_dtype, keep_logits=True)
        if megatron is None:
            return None  # not rank 0: rank 0 serves and compares
        seqs = megatron.pop("ids").tolist()
    served = serve([(str(out_dir), dtype)], prompts, seqs, max_new_tokens=max_new_tokens, python=python)
    run = served.runs[0]
    if run.error:
        raise CheckpointError(f"vLLM {served.vllm} ({served.platform}) does not load {out_dir}: {run.error}")
    rule = rule_for(dtype, cfg.quantized)
    if rule.noise_factor is None:  # exact: transformers in the served dtype (FP32)
        reference, noise, reference_dtype = transformers_logits(out_dir, dtype), None, dtype
    else:  # calibrated: transformers' FP32, and its own BF16 against it
        (reference, noise), reference_dtype = fp32_reference_and_noise(out_dir, seqs), "float32"
    result = {"export": str(out_dir), "engine": "vllm", "vllm": served.vllm, "platform": served.platform,
              "dtype": dtype, "overrides": served.overrides, "mxfp4_moe_gate_overridden": run.mxfp4_moe_gate_overridden,
              "engine_start_s": run.start_s, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
              "sequences": len(seqs), "seq_length": seq_length, "rule": rule.describe(noise),
              "reference_dtype": reference_dtype,
              "transformers": compare(positions(reference, prompts, seqs, run), rule, noise).to_dict()}
    del reference
    if megatron is not None:
        if noise is None:
            noise = fp32_reference_and_noise(out_dir, seqs)[1]
        logits = {tuple(s): lg.float() for s, lg in zip(seqs, megatron.pop("logits"))}
        result["megatron"] = compare(teacher_forced_positions(lambda ids: logits[tuple(ids)], seqs, run),
                                     NEAR_TIE, noise).to_dict()
        result["megatron_vs_transformers"] = megatron
    return result


def report(r: dict) -> list[str]:
    """The lines `verify-export --engine vllm` prints (the JSON line comes after them)."""
    head = f"verify-export: vLLM {r['vllm']} ({r['platform']}, {r['dtype']}) on {r['export']}: {r['prompts']} " \
           f"prompts x {r['max_new_tokens']} greedy tokens, {r['sequences']} sequences x {r['seq_length']} tokens " \
           f"teacher-forced; engine start {r['engine_start_s']:.1f} s; {r['rule']}"
    lines = [head] + [f"  vLLM patched: {o}" for o in r["overrides"] if r["mxfp4_moe_gate_overridden"]]
    lines.append(f"  against transformers ({r['reference_dtype']}): {r['transformers']['summary']}")
    if "megatron" in r:
        m = r["megatron_vs_transformers"]
        lines.append(f"  against the megatron checkpoint (teacher-forced, near-tie rule): {r['megatron']['summary']}")
        lines.append(f"  megatron vs transformers (bfloat16): cosine min {m['min_cos']:.6f}, top-1 {m['top1']:.2%}")
    return lines


def passed(r: dict) -> bool:
    return r["transformers"]["ok"] and r.get("megatron", {"ok": True})["ok"]
