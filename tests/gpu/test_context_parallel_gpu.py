"""GPU tier for context parallelism (issue 23; parallel.cp, TE's all-to-all attention with sinks and the sliding
window, compat.py 13): CP2 against CP1 on the tiny gpt-oss under TE's spec, one global batch through the training
step's code (cp_worker.py), logits and every parameter's gradient compared.

The tolerance is the BF16 run's own: the CP1 run repeated with the global batch in two micro-batches instead of one
changes which tokens each GEMM and each gradient accumulation sees, as CP does. CP2 may differ from CP1 by at most
4 x that: the loss (or 1e-4 of it), the largest logit difference (or 0.1), each gradient's relative difference (or
2e-2 of its norm where the split changes less), the per-token logits' smallest cosine (1 - cos at most 4 x the
split's); top-1 agreement may be 1 point below the split's. Without compat.py 13 every sink's gradient must fail
that (TE 2.20 gathers it). An expert that CP2 routed other tokens than CP1 (a near-tied top-k choice flipped by BF16
noise; at most 0.5% of the routed assignments may move) has another gradient: its tensors beyond the tolerance are
reported, not failed. The random tiny model routes a few experts only a few dozen tokens, where one token more or
less moves the gradient by ~1/sqrt(n) (sixteenth session: layer 2's expert 0, 35 tokens, rerouted, 0.20-0.23 off;
every other tensor, rerouted or not, within the tolerance).
Sequences are 1024 tokens, 8 x the sliding window; one fills its sequence, one ends in padding (data.packing=false).

With one GPU, the two CP ranks share it over a gloo process group (cp_worker.py): the arithmetic is each rank's, the
transport is not NCCL. Prints `RESULT ...` lines."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import env, result, torchrun_cmd, wait_ok
from parity import relative_difference as rel

from gptoss_nemo.compat import te_gathers_sink_gradients
from gptoss_nemo.model.impl import te_problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(te_problem() is not None, reason=f"needs TE: {te_problem()}")]

WORKER = Path(__file__).with_name("cp_worker.py")
SEQ = 1024
GRAD_FLOOR = 2e-2  # of a gradient's norm, where splitting the batch changes it by less
NOISE_FACTOR = 4
MAX_REROUTED = 0.005  # of the routed (token, expert) assignments: BF16 noise flips near-tied top-k choices
EXPERT_TENSOR = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts\.linear_fc[12]\.(?:weight|bias)(\d+)$")  # TE's names


def _run_all(jobs: list[list[str]], timeout: int = 400) -> None:
    """Every job at once (the tiny model leaves the GPU mostly idle); any failure fails the test with its output."""
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in jobs]
    for proc in procs:
        wait_ok(proc, timeout)


def _logits(run: Path) -> torch.Tensor:
    """[b, s, vocab] in sequence order, from each CP rank's share."""
    shares = [torch.load(f, weights_only=True) for f in sorted(run.glob("logits_cp*.pt"))]
    b, _, vocab = shares[0]["logits"].shape
    full = torch.full((b, SEQ, vocab), float("nan"), dtype=torch.bfloat16)
    for share in shares:
        full[:, share["positions"]] = share["logits"]
    assert not full.isnan().any(), f"{run}: the CP ranks' positions do not cover the sequence"
    return full


def _logit_stats(a: torch.Tensor, ref: torch.Tensor) -> dict:
    a, ref = a.flatten(0, 1).float(), ref.flatten(0, 1).float()
    cos = torch.nn.functional.cosine_similarity(a, ref, dim=-1)
    return {"max_abs": float((a - ref).abs().max()), "min_cosine": float(cos.min()),
            "top1": float((a.argmax(-1) == ref.argmax(-1)).float().mean()),
            "bitwise_tokens": float((a == ref).all(-1).float().mean())}


def test_cp2_logits_and_gradients_equal_cp1(tiny_with_tokenizer, tmp_path):
    hf = str(tiny_with_tokenizer)
    runs = {name: tmp_path / name for name in ("cp1", "cp1-split", "cp2", "cp2-bare")}

    def worker(name: str, cp: int, micro: int, *extra: str) -> list[str]:
        args = [str(WORKER), "--cp", str(cp), "--hf", hf, "--seq", str(SEQ), "--batch", "2", "--micro-batch",
                str(micro), "--out", str(runs[name]), *extra]
        return torchrun_cmd(cp, *args, port=29880 + 10 * len(name)) if cp > 1 else [sys.executable, *args]

    _run_all([worker("cp1", 1, 2), worker("cp1-split", 1, 1), worker("cp2", 2, 2),
              worker("cp2-bare", 2, 2, "--skip-patches", "te_cp_sink_gradient")])
    meta = {name: json.loads((run / "result.json").read_text()) for name, run in runs.items()}
    result("cp_runs", {k: {f: v[f] for f in ("cp", "backend", "shared_gpu", "micro_batch", "loss", "loss_tokens")}
                       for k, v in meta.items()})
    gathered = te_gathers_sink_gradients()
    assert ("te_cp_sink_gradient" in meta["cp2"]["patches"]) == gathered
    assert "te_cp_sink_gradient" not in meta["cp2-bare"]["patches"]

    ref = _logits(runs["cp1"])
    split, cp2 = _logit_stats(_logits(runs["cp1-split"]), ref), _logit_stats(_logits(runs["cp2"]), ref)
    result("cp_logits", {"cp1_split_vs_cp1": split, "cp2_vs_cp1": cp2})
    assert cp2["max_abs"] <= max(NOISE_FACTOR * split["max_abs"], 0.1), (cp2, split)
    assert 1 - cp2["min_cosine"] <= NOISE_FACTOR * (1 - split["min_cosine"]) + 1e-6, (cp2, split)
    assert cp2["top1"] >= split["top1"] - 0.01, (cp2, split)

    losses = {k: v["loss"] for k, v in meta.items()}
    assert meta["cp2"]["loss_tokens"] == meta["cp1"]["loss_tokens"]
    loss_noise = abs(losses["cp1-split"] - losses["cp1"])
    assert abs(losses["cp2"] - losses["cp1"]) <= max(NOISE_FACTOR * loss_noise, 1e-4 * abs(losses["cp1"])), losses

    routed = {k: torch.tensor(v["routed_tokens"]).long() for k, v in meta.items()}
    moved = int((routed["cp2"] - routed["cp1"]).abs().sum()) // 2
    rerouted = {tuple(x) for x in (routed["cp2"] != routed["cp1"]).nonzero().tolist()}  # (layer, expert)
    result("cp_routing", {"assignments": int(routed["cp1"].sum()), "moved_cp2": moved, "rerouted": sorted(rerouted),
                          "their_tokens_cp1": [int(routed["cp1"][x]) for x in sorted(rerouted)],
                          "moved_split": int((routed["cp1-split"] - routed["cp1"]).abs().sum()) // 2})
    assert moved <= MAX_REROUTED * routed["cp1"].sum(), (moved, rerouted)

    g = {name: torch.load(run / "grads.pt", weights_only=True) for name, run in runs.items()}
    assert g["cp2"].keys() == g["cp1"].keys()
    rows, bad = {}, []
    for name, ref_grad in g["cp1"].items():
        noise = rel(g["cp1-split"][name], ref_grad)
        err, bare = rel(g["cp2"][name], ref_grad), rel(g["cp2-bare"][name], ref_grad)
        rows[name] = {"cp2": err, "split": noise, "bare": bare}
        if err > max(NOISE_FACTOR * noise, GRAD_FLOOR):
            expert = EXPERT_TENSOR.match(name)
            if expert and (int(expert[1]), int(expert[2])) in rerouted:
                rows[name]["rerouted"] = True  # other tokens, another gradient: reported, not failed
            else:
                bad.append((name, rows[name]))
    sinks = {k: v for k, v in rows.items() if k.endswith("softmax_offset")}
    compared = {k: v for k, v in rows.items() if "rerouted" not in v}
    worst = max(compared.items(), key=lambda kv: kv[1]["cp2"] / max(NOISE_FACTOR * kv[1]["split"], GRAD_FLOOR))
    result("cp_gradients", {"tensors": len(rows), "within_tolerance": len(compared), "worst": worst, "sinks": sinks,
                            "rerouted": {k: v for k, v in rows.items() if "rerouted" in v},
                            "max_rel_cp2": max(r["cp2"] for r in compared.values()),
                            "max_rel_split": max(r["split"] for r in rows.values())})
    assert sinks, "no attention sinks (softmax_offset) among the parameters"
    assert not bad, f"{len(bad)} gradients differ beyond the tolerance: {bad[:5]}"
    if gathered:  # without compat 13 every sink's gradient comes out CP times too large
        assert all(v["bare"] > max(NOISE_FACTOR * v["split"], GRAD_FLOOR) for v in sinks.values()), sinks
