"""Serve Hugging Face gpt-oss exports with vLLM and write down what it computed. Runs in vLLM's own Python (its
own venv: vLLM pins a torch of its own), so it imports nothing but the standard library and vLLM:

    VLLM_PYTHON vllm_worker.py SPEC.json OUT.json

SPEC.json: {"runs": [{"model": DIR, "dtype": "float32" | "bfloat16"}, ...], "prompts": [[token id, ...], ...],
            "sequences": [[token id, ...], ...], "max_new_tokens": 16, "top_logprobs": 2, "max_model_len": 1024}

For each run (one engine start each, one after the other) vLLM generates greedily from every prompt
(`max_new_tokens`, end-of-text ignored, so every engine writes the same number of tokens) and scores every
sequence teacher-forced (prompt logprobs: its `top_logprobs` best tokens at each position). OUT.json:

    {"vllm": version, "platform": "cpu" | "cuda" | ..., "cpu_amx": bool | null, "overrides": [text, ...],
     "runs": [{"model", "dtype", "quant_method", "start_s", "mxfp4_moe_gate_overridden": bool, "error": text | null,
               "generations": [{"tokens": [...], "logprobs": [...]}],          # the chosen token's logprob
               "teacher_forced": [{"top": [[[id, logprob], ...], ...]}]}]}      # per position 1..T-1, best first

A run whose engine refuses the export (an unsupported quantization, say) records vLLM's error and the next run
goes on. Tokens go in as ids (`skip_tokenizer_init`), so the export's tokenizer files are not read.

The one patch: vLLM's CPU MXFP4 MoE experts (`CPUExpertsMxfp4`) declare themselves unsupported on x86 CPUs without
AMX tiles (torch.cpu._is_amx_tile_supported()), although the kernel they run needs no AMX (issue 24 ran the tiny
exports with it on AVX512-BF16 CPUs); no other MXFP4 MoE backend runs on a CPU, so there vLLM refuses MXFP4 exports
("No MXFP4 MoE backend supports the deployment configuration"). Only where vLLM's own gate says no (vLLM's CPU
platform, x86, no AMX tiles) this drops the AMX condition of that one check, and says so in OUT.json. Every other
AMX check stays (overriding them all crashes the CPU attention kernel, which does need AMX where it asks). On a CPU
with AMX nothing is patched. The patch is applied at import, so that an engine process vLLM spawns, which imports
this file again as its `__main__`, has it too.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

_GATE_ENV = "GPTOSS_NEMO_VLLM_MXFP4_GATE_OVERRIDE"  # set by main() for the processes vLLM starts
RUN_MARK = "== gptoss-nemo vllm_worker run"
GATE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe.CPUExpertsMxfp4._supports_current_device"


def _x86_cpu() -> bool:
    """vLLM runs on its CPU platform on an x86 CPU."""
    from vllm.platforms import CpuArchEnum, current_platform

    return current_platform.is_cpu() and current_platform.get_cpu_architecture() == CpuArchEnum.X86


def _override_mxfp4_gate() -> None:
    """CPUExpertsMxfp4 supported on any x86 CPU platform: its own check without the AMX-tile condition."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    cpu_moe.CPUExpertsMxfp4._supports_current_device = staticmethod(_x86_cpu)


if os.environ.get(_GATE_ENV) == "1":
    _override_mxfp4_gate()


def _needs_gate_override() -> bool:
    """vLLM's own gate refuses its CPU MXFP4 experts here: an x86 CPU platform without AMX tiles (torch's probe, the
    one vLLM's gate asks)."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    return _x86_cpu() and not cpu_moe.CPUExpertsMxfp4._supports_current_device()


def _torch_amx() -> bool | None:
    """torch's AMX-tile probe (vLLM's gates ask it); None off x86 CPU platforms."""
    import torch

    if not _x86_cpu():
        return None
    return bool(torch.cpu._is_amx_tile_supported())


def _quant_method(model: str) -> str | None:
    with open(os.path.join(model, "config.json")) as f:
        return (json.load(f).get("quantization_config") or {}).get("quant_method")


def _top(position: dict, k: int) -> list[list]:
    """[[token id, logprob], ...] of one position's `k` best prompt-logprob tokens, vLLM's rank 1 first (vLLM adds
    the prompt's own token, at whatever rank it has)."""
    ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in position.items() if lp.rank is not None and lp.rank <= k)
    return [[tok, logprob] for _, tok, logprob in ranked]


def serve(run: dict, spec: dict, gate_overridden: bool) -> dict:
    """One engine: start it on the export, generate, score the sequences, shut it down."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    quant = _quant_method(run["model"])
    out = {"model": run["model"], "dtype": run["dtype"], "quant_method": quant, "error": None,
           "mxfp4_moe_gate_overridden": gate_overridden and quant == "mxfp4"}
    t0 = time.monotonic()
    try:
        llm = LLM(model=run["model"], dtype=run["dtype"], skip_tokenizer_init=True, seed=0,
                  max_model_len=spec["max_model_len"], max_logprobs=max(spec["top_logprobs"], 1),
                  enforce_eager=True)
    except Exception as e:  # the engine refused the export: its words are the result
        out["error"] = f"{type(e).__name__}: {e}"
        out["start_s"] = round(time.monotonic() - t0, 1)
        return out
    out["start_s"] = round(time.monotonic() - t0, 1)
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], ignore_eos=True, logprobs=1,
                            detokenize=False)
    scored = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=spec["top_logprobs"], detokenize=False)
    gens = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], greedy, use_tqdm=False)
    out["generations"] = [{"tokens": list(g.outputs[0].token_ids),
                           "logprobs": [step[tok].logprob for tok, step in zip(g.outputs[0].token_ids,
                                                                               g.outputs[0].logprobs)]}
                          for g in gens]
    seqs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in spec["sequences"]], scored, use_tqdm=False)
    out["teacher_forced"] = [{"top": [_top(pos, spec["top_logprobs"]) for pos in s.prompt_logprobs[1:]]} for s in seqs]
    out["run_s"] = round(time.monotonic() - t0 - out["start_s"], 1)
    del llm
    gc.collect()
    return out


def main(spec_path: str, out_path: str) -> None:
    import vllm
    from vllm.platforms import current_platform

    with open(spec_path) as f:
        spec = json.load(f)
    overrides = []
    gate = _needs_gate_override()
    if gate:
        os.environ[_GATE_ENV] = "1"
        _override_mxfp4_gate()
        overrides.append(f"{GATE}: the AMX-tile condition dropped (this x86 CPU has no AMX tiles, so vLLM refuses "
                         "MXFP4 experts); every other vLLM check unchanged")
    result = {"vllm": vllm.__version__, "platform": current_platform.device_type, "cpu_amx": _torch_amx(),
              "overrides": overrides, "runs": []}
    for i, run in enumerate(spec["runs"]):
        print(f"{RUN_MARK} {i}: {run['model']}", file=sys.stderr, flush=True)  # where each run's log begins
        result["runs"].append(serve(run, spec, gate))
        with open(out_path, "w") as f:  # what is done so far, should a later engine take the process down
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
