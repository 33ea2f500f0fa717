"""GPU tier for one model in two implementations (issue 21; model/impl.py): Transformer Engine's spec against the
local spec's fused kernels.

  - checkpoints cross implementations both ways: an import exports bit-identically under the other; an SFT run
    started under one resumes under the other; a QAT run (MXFP4 and NVFP4, quantizers and amax) resumes under the
    other and both export the same bits, which dequantize exactly to the fake-quantized weights (NVFP4 under TE:
    one amax per layer projection, shared by its experts, as the export's single scale needs)
  - packed documents stay apart: a packed micro-batch (with padding) gives each document the logits and the
    gradients it gets alone (fused: flex attention; te: THD attention, where cuDNN >= 9.26 has its backward)
  - deterministic mode under TE: test_sft_gpu.py's SIGKILL-resume test with GPU_TESTS_IMPL=te
  - (two GPUs) a TP2 PTQ under TE keeps every TP rank's sinks

Skipped where Transformer Engine does not import. Prints `RESULT ...` lines (collected into tests/gpu/RESULTS.md)."""

import shutil
from pathlib import Path

import pytest
import torch

from export_check import exported_equal, fake_quant_exact
from launch import json_line, result, stage_args, torchrun
from parity import relative_difference
from tiny_ckpt import checkpoint_with_tokenizer

from gptoss_nemo.checkpoint.hf_layout import read_tensors
from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
from gptoss_nemo.model.impl import te_packing_problem, te_problem
from gptoss_nemo.model.presets import tiny
from gptoss_nemo.train.metrics_log import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(te_problem() is not None, reason=f"TE: {te_problem()}")]
PAIRS = [("te", "fused"), ("fused", "te")]
SHORT = ("train.eval_every=0", "train.plots=false", "optimizer.warmup_steps=1", "train.global_batch_size=8",
         "train.micro_batch_size=4")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny MXFP4 checkpoint with tokenizer files, and its BF16 twin (the same seed: exactly the dequantized
    values)."""
    d = tmp_path_factory.mktemp("impl")
    mx = checkpoint_with_tokenizer(d / "tiny-mxfp4", tiny())
    bf = write_tiny_checkpoint(d / "tiny-bf16", tiny(), seed=1234, quantized=False, tokenizer=False)
    return mx, bf


def _cli(*args, port: int, timeout: int = 300):
    return torchrun(1, "-m", "gptoss_nemo", *args, port=port, timeout=timeout)


def _drop_last(run: Path, step: int) -> None:
    """Leave the run as if killed after its checkpoint before `step`: the last checkpoint goes."""
    shutil.rmtree(run / "checkpoints" / f"step_{step:07d}")
    (run / "checkpoints" / "latest").unlink(missing_ok=True)


@pytest.mark.parametrize("src,dst", PAIRS)
def test_import_and_sft_resume_across_implementations(tiny_pair, tmp_path, src, dst):
    mx, bf = tiny_pair
    port = 29960 + 10 * PAIRS.index((src, dst))
    ckpt = tmp_path / "import"
    _cli("import", str(mx), str(ckpt), "--impl", src, port=port)
    _cli("export", str(ckpt), str(tmp_path / "hf"), "--impl", dst, port=port + 1)
    got, want = read_tensors(tmp_path / "hf"), read_tensors(bf)
    same = sum(torch.equal(got[k], want[k]) for k in want)
    assert set(got) == set(want) and same == len(want), (same, len(want))
    run = tmp_path / "sft"
    args = ("train.steps=6", "train.save_every=3", *SHORT)
    first = json_line(torchrun(1, *stage_args("sft", ckpt, run, *args, impl=src), port=port + 2, timeout=300), "sft")
    before = {r["step"]: r["lm_loss"] for r in read_metrics(run / "metrics.jsonl") if r["step"] > 0}
    _drop_last(run, 6)
    again = json_line(torchrun(1, *stage_args("sft", ckpt, run, *args, impl=dst), port=port + 3, timeout=300), "sft")
    after = {r["step"]: r["lm_loss"] for r in read_metrics(run / "metrics.jsonl") if r["step"] > 0}
    rel = max(abs(after[s] - before[s]) / before[s] for s in (4, 5, 6))
    result(f"checkpoints {src} -> {dst}", {"import_export_tensors_identical": f"{same}/{len(want)}",
                                            "sft_resumed_from": again["resumed_from"], "steps": sorted(after),
                                            "lm_loss_steps_4_6_max_rel_diff_vs_uninterrupted_" + src: rel})
    assert first["resumed_from"] == 0 and again["resumed_from"] == 3 and sorted(after) == list(range(1, 7))
    assert after[3] == before[3] and rel < 0.02, (before, after)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_qat_checkpoints_across_implementations(tiny_pair, tmp_path, fmt):
    """QAT under TE, resumed under the fused local kernels; the final checkpoint exported under both: the same
    bits, dequantizing exactly to the fake-quantized weights."""
    mx, _ = tiny_pair
    port = 29980 + 10 * ["mxfp4", "nvfp4"].index(fmt)
    ckpt = tmp_path / "import"
    _cli("import", str(mx), str(ckpt), "--impl", "te", port=port)
    run = tmp_path / "qat"
    args = (f"quant.format={fmt}", "train.steps=4", "train.save_every=2", *SHORT)
    torchrun(1, *stage_args("qat", ckpt, run, *args, impl="te"), port=port + 1, timeout=400)
    _drop_last(run, 4)
    resumed = json_line(torchrun(1, *stage_args("qat", ckpt, run, *args, impl="fused"), port=port + 2, timeout=400),
                        "qat")
    final = run / "checkpoints" / "step_0000004"
    for i, (impl, form) in enumerate([(i, f) for i in ("te", "fused") for f in (fmt, "bf16")]):
        _cli("export", str(final), str(tmp_path / f"{impl}-{form}"), "--format", form, "--impl", impl,
             port=port + 3 + i)
    same = {form: exported_equal(tmp_path / f"te-{form}", tmp_path / f"fused-{form}") for form in (fmt, "bf16")}
    exact = fake_quant_exact(tmp_path / f"te-{fmt}", tmp_path / "te-bf16", fmt)
    result(f"QAT {fmt}: te -> resumed under fused -> exported under both", {
        "resumed_from": resumed["resumed_from"], "exports_te_vs_fused_identical": same,
        "dequantized_vs_fake_quant": exact})
    assert resumed["resumed_from"] == 2
    assert all(s["identical"] == s["tensors"] for s in same.values()), same
    assert exact["elements"] and exact["equal"] == exact["elements"], exact


def _packed_batch(vocab: int, lengths: list[list[int]], seq: int):
    """Micro-batch of packed documents (position ids restart per document, padding at 0) and each document alone."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(len(lengths), seq, dtype=torch.long)
    pos = torch.zeros(len(lengths), seq, dtype=torch.long)
    docs = []
    for b, row in enumerate(lengths):
        at = 0
        for n in row:
            ids = torch.randint(0, vocab, (n,), generator=g)
            tokens[b, at:at + n], pos[b, at:at + n] = ids, torch.arange(n)
            docs.append((b, at, ids))
            at += n
    return {"tokens": tokens, "position_ids": pos}, docs


def _per_document(model, rows) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Each document's logits (FP32, detached) and the parameter gradients of the sum over documents of their
    positions' logsumexp; `rows`: (logits [k, 512, V], row, start, length) per document."""
    model.zero_grad()
    logits, loss = [], 0.0
    for out, b, at, n in rows:
        loss = loss + out[b, at:at + n].float().logsumexp(-1).sum()
        logits.append(out[b, at:at + n].detach().float())
    loss.backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _agreement(a, b) -> dict:
    (la, ga), (lb, gb) = a, b
    return {"min_cosine": min(torch.nn.functional.cosine_similarity(x, y, dim=-1).min().item() for x, y in zip(la, lb)),
            "min_top1": min((x.argmax(-1) == y.argmax(-1)).float().mean().item() for x, y in zip(la, lb)),
            "max_grad_rel_diff": max(relative_difference(ga[n], gb[n]) for n in gb)}


@pytest.mark.parametrize("impl", ["te", "fused"])
def test_packed_documents_stay_apart(megatron_parallel, impl):
    """One micro-batch of two packed sequences (five documents and padding): every document's logits, and the
    gradients of a loss on all of them, equal what each document gets run alone, to within the arithmetic's own
    noise: the five documents unpacked, one per row of one batch, against each alone in a batch of one (no document
    can see another there; only the kernels' shapes differ, as they do when packed). Each document alone is one
    sequence of the same length (the document, then padding, which causal attention keeps out of it), so the
    compiled kernels see one length. fused runs in FP32 (flex attention takes it: a leak would stand far above the
    noise); te in BF16 (its packed THD attention is cuDNN's, BF16/FP16 only), where near-tie routings of the random
    tiny model flip between batch shapes and the noise is that of BF16."""
    if impl == "te" and te_packing_problem():
        pytest.skip(te_packing_problem())
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from gptoss_nemo.model.build import build_model, transformer_config
    from gptoss_nemo.train.step import model_inputs

    hf = tiny()
    dtype = torch.float32 if impl == "fused" else torch.bfloat16
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1234)
    model = build_model(hf, transformer_config(hf, None, impl, params_dtype=dtype))
    model.eval()  # no load-balancing loss: it would see the padding and couple the documents (autograd stays on)
    batch, docs = _packed_batch(hf.vocab_size, [[150, 200, 100], [300, 140]], 512)
    inputs, documents = model_inputs(impl, batch, "cuda", thd=True)
    out = model(inputs["tokens"], inputs["position_ids"], **documents).reshape(2, 512, -1)  # te: [1, 2 x 512, V]
    packed = _per_document(model, [(out, b, at, len(ids)) for b, at, ids in docs])
    rows = torch.zeros(len(docs), 512, dtype=torch.long, device="cuda")
    for i, (_, _, ids) in enumerate(docs):
        rows[i, :len(ids)] = ids.cuda()
    positions = torch.arange(512, device="cuda").unsqueeze(0)
    out = model(rows, positions.expand(len(docs), -1), attention_mask=None)
    together = _per_document(model, [(out, i, 0, len(ids)) for i, (_, _, ids) in enumerate(docs)])
    alone = _per_document(model, [(model(rows[i:i + 1], positions, attention_mask=None), 0, 0, len(ids))
                                  for i, (_, _, ids) in enumerate(docs)])
    got, noise = _agreement(packed, alone), _agreement(together, alone)
    result(f"packed documents under {impl} ({str(dtype).removeprefix('torch.')}), against each alone",
           {"packed": got, "unpacked_batch_of_5_noise": noise})
    assert 1 - got["min_cosine"] <= 2 * (1 - noise["min_cosine"]) + 1e-6, (got, noise)
    assert got["min_top1"] >= noise["min_top1"] - 0.01, (got, noise)
    assert got["max_grad_rel_diff"] <= 2 * noise["max_grad_rel_diff"] + 1e-4, (got, noise)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@two_gpus
def test_tp2_ptq_under_te_keeps_every_ranks_sinks(tiny_pair, tmp_path):
    """PTQ under TE with TP2 changes no weight: its checkpoint's sinks, exported at TP1, are the import's."""
    mx, bf = tiny_pair
    ckpt = tmp_path / "import"
    _cli("import", str(mx), str(ckpt), "--impl", "te", port=29990)
    out = tmp_path / "ptq"
    torchrun(2, *stage_args("ptq", ckpt, out, "parallel.tp=2", *SHORT, impl="te"), port=29991, timeout=400)
    _cli("export", str(out / "checkpoint"), str(tmp_path / "hf"), "--impl", "te", port=29992)
    got, want = read_tensors(tmp_path / "hf"), read_tensors(bf)
    sinks = [k for k in want if k.endswith("sinks")]
    same = sum(torch.equal(got[k], want[k]) for k in sinks)
    result("TP2 PTQ under TE: sinks after export", {"sinks": len(sinks), "identical": same})
    assert sinks and same == len(sinks)

