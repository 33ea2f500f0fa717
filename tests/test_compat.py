"""The megatron-core workarounds (gptoss_nemo/compat.py): each bug reproduces on CPU with the installed code, and
the workaround fixes it."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel(1, 1)
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig
    if sys.argv[1] == "patched":
        from gptoss_nemo.compat import apply_megatron_patches
        print("patches", apply_megatron_patches())
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=1, ffn_hidden_size=32,
        num_moe_experts=2, moe_ffn_hidden_size=32, gated_linear_unit=True, activation_func=quick_gelu,
        glu_linear_offset=1.0, activation_func_clamp_value=7.0, add_bias_linear=True, bias_activation_fusion=False,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    mlp = MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
              is_expert=True, ffn_hidden_size=32)
    x, scale = torch.randn(5, 32, requires_grad=True), torch.rand(5)
    out, bias = mlp(x, scale)
    out.sum().backward()
    fc2_bias = mlp.linear_fc2.bias
    assert bias is None and fc2_bias.grad is not None
    assert torch.allclose(fc2_bias.grad, scale.sum().expand_as(fc2_bias)), "bias grad must be sum of token scales"
    print("backward ok")
""")


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (the workarounds patch process-wide), with `args` and extra environment."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, timeout=300)


def _last_line(script: str, mode: str) -> str:
    """What `script` run with `mode` ("bare" or "patched") printed last; it must exit cleanly."""
    r = _python(script, mode)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def _run(mode: str, port: int) -> subprocess.CompletedProcess:
    return _python(SCRIPT, mode, str(port))


def test_bug_present_in_installed_megatron_and_patch_fixes_it():
    bare = _run("bare", 29621)
    patched = _run("patched", 29622)
    assert "backward ok" in patched.stdout, patched.stderr[-2000:]
    if "patches []" in patched.stdout:  # a megatron-core without the bug: nothing patched, and none needed
        assert bare.returncode == 0, bare.stderr[-2000:]
        return
    assert "'expert_bias_inplace_add'" in patched.stdout
    assert bare.returncode != 0 and "is a view and is being modified inplace" in bare.stderr


def _adamw_after_one_step(params):
    import torch

    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_adamw_shared_step_after_load_and_its_repair():
    """megatron's DistributedOptimizer.load_state_dict hands every parameter the same `step` tensor; torch's foreach
    AdamW then counts one step per parameter. unshare_adamw_steps restores one counter per parameter."""
    from types import SimpleNamespace

    import torch

    from gptoss_nemo.compat import unshare_adamw_steps

    def resumed(repair: bool):
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
        state = _adamw_after_one_step(params).state_dict()
        shared = torch.tensor(10.0)
        for s in state["state"].values():
            s["step"] = shared  # what megatron's load_state_dict does without Apex/TE
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        opt.load_state_dict(state)
        chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)])
        fixed = unshare_adamw_steps(chained) if repair else 0
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return [s["step"].item() for s in opt.state.values()], fixed

    assert resumed(repair=False)[0] == [13.0, 13.0, 13.0]  # the bug: 10 + one increment per parameter
    assert resumed(repair=True) == ([11.0, 11.0, 11.0], 2)


def test_adamw_step_key_on_load_patch():
    """Loading `fully_reshardable` optimizer state: the checkpoint's per-parameter tensors have no `step`."""
    from types import SimpleNamespace

    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from gptoss_nemo.compat import apply_megatron_patches

    param = torch.nn.Parameter(torch.zeros(4))
    inner = _adamw_after_one_step([param])
    fake = SimpleNamespace(model_param_group_index_map={"p": (0, 0)}, optimizer=inner,
                           config=SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False))
    saved = {"param": torch.full((4,), 2.0), "exp_avg": torch.full((4,), 3.0), "exp_avg_sq": torch.full((4,), 4.0)}
    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if not getattr(original, "__gptoss_nemo_patched__", False):
        with pytest.raises(KeyError, match="step"), torch.no_grad():  # megatron calls it under no_grad
            original(fake, "p", saved)
    assert "adamw_step_key_on_load" in apply_megatron_patches()
    with torch.no_grad():
        DistributedOptimizer._set_main_param_and_optimizer_states(fake, "p", saved)
    state = inner.state[param]
    assert torch.equal(param.data, saved["param"]) and torch.equal(state["exp_avg_sq"], saved["exp_avg_sq"])
    assert state["step"].item() == 1.0  # left as load_state_dict set it


def test_linear_bias_in_gemm_patch():
    """megatron's local linear rounds the GEMM to BF16 and then again after the bias; patched, the bias is added in
    the GEMM (one rounding, as TE and transformers' F.linear do), closer to the exact result; backward unchanged."""
    import torch
    from megatron.core.tensor_parallel.layers import LinearWithGradAccumulationAndAsyncCommunication as Linear

    from gptoss_nemo.compat import apply_megatron_patches

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 96, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(80, 96, generator=gen) / 10).bfloat16().requires_grad_()
    b = (torch.randn(80, generator=gen) * 3).bfloat16().requires_grad_()
    upstream = torch.randn(64, 3, 80, generator=gen).bfloat16()

    def run():
        out = Linear.apply(x, w, b, False, False, False, None, None, None, 1)
        return out.detach(), torch.autograd.grad(out, (x, w, b), upstream)

    exact = x.double() @ w.double().t() + b.double()
    bare_grads = None  # the unpatched run, when this process has not patched megatron yet
    if not getattr(Linear.forward, "__gptoss_nemo_patched__", False):
        bare, bare_grads = run()
        assert torch.equal(bare, x @ w.t() + b)  # two roundings
    assert "linear_bias_in_gemm" in apply_megatron_patches()
    fused, grads = run()
    assert torch.equal(fused, torch.nn.functional.linear(x, w, b))
    assert (fused.double() - exact).abs().mean() < (x @ w.t() + b).double().sub(exact).abs().mean()
    if bare_grads is not None:
        assert all(torch.equal(a, c) for a, c in zip(bare_grads, grads))


def test_a_workaround_can_be_left_out():
    code = ("from gptoss_nemo.compat import apply_megatron_patches\n"
            "from megatron.core.tensor_parallel.layers import LinearWithGradAccumulationAndAsyncCommunication as L\n"
            "print(apply_megatron_patches(), getattr(L.forward, '__gptoss_nemo_patched__', False))")
    out = _python(code, GPTOSS_NEMO_SKIP_PATCHES="linear_bias_in_gemm, x")
    applied, patched = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert "'expert_bias_inplace_add'" in applied and "linear_bias_in_gemm" not in applied and patched == "False", out


ROUTER_SCRIPT = textwrap.dedent("""
    import sys, torch
    from megatron.core.transformer.moe import moe_utils
    seen = []
    def te_general_gemm(a, b, out_dtype, layout, bias=None):  # stands in for TE's (only what reaches it matters)
        seen.append(None if bias is None else bias.dtype)
        return (torch.mm(b.to(out_dtype), a.to(out_dtype).t()) + (0 if bias is None else bias.to(out_dtype)),)
    moe_utils.te_general_gemm = te_general_gemm
    if sys.argv[1] == "patched":
        from gptoss_nemo.compat import apply_megatron_patches
        assert "router_bias_in_te_gemm" in apply_megatron_patches()
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((6, 16), (4, 16), (4,)))
    out = moe_utils.RouterGatingLinearFunction.apply(x, w, b, torch.float32)
    exact = torch.addmm(b.float(), x.float(), w.float().t())
    print(seen, out.dtype, torch.allclose(out, exact, rtol=0, atol=1e-6))
""")


@pytest.mark.parametrize("mode,expected", [("bare", "[torch.bfloat16] torch.float32"),
                                           ("patched", "[None] torch.float32 True")])
def test_router_bias_kept_out_of_te_gemm(mode, expected):
    """With TE installed megatron computes the router logits with TE's GEMM, handing it gpt-oss's BF16 router bias
    for an FP32 output (wrong logits on the GPU: compat.py 10); patched, TE gets no bias and the FP32 logits are
    x w^T + b exactly."""
    assert _last_line(ROUTER_SCRIPT, mode).startswith(expected)


def test_sink_gradients_are_divided_over_context_parallel_ranks():
    """Workaround 13: where TE hands every CP rank the whole sinks' gradient, each rank's share is 1/cp of it, so
    DDP's sum over the CP ranks is the gradient; other parameters and CP 1 are left alone."""
    import torch

    from gptoss_nemo.compat import scale_sink_gradients_over_cp, te_gathers_sink_gradients

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.softmax_offset = torch.nn.Parameter(torch.zeros(4))
            self.other = torch.nn.Parameter(torch.zeros(4))

    def grads(cp: int, gathered: bool):
        m = torch.nn.Sequential(Attention())
        hooked = scale_sink_gradients_over_cp(m, cp, gathered=gathered)
        (m[0].softmax_offset * torch.arange(4.0) + m[0].other * 2).sum().backward()
        return hooked, m[0].softmax_offset.grad.tolist(), m[0].other.grad.tolist()

    assert grads(4, True) == (1, [0.0, 0.25, 0.5, 0.75], [2.0] * 4)
    assert grads(1, True) == (0, [0.0, 1.0, 2.0, 3.0], [2.0] * 4)
    assert grads(4, False) == (0, [0.0, 1.0, 2.0, 3.0], [2.0] * 4)
    assert te_gathers_sink_gradients() in (True, False)  # False here without TE; the GPU tier reads TE 2.20's source


def test_checkpoint_without_output_default_is_not_fp8():
    """Workaround 14: megatron's norm recompute builds CheckpointWithoutOutput() (fp8=False), which the installed
    megatron-core takes for FP8 and then asks TE's FP8 state, absent without TE."""
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    from gptoss_nemo.compat import apply_megatron_patches

    assert "checkpoint_without_output_fp8" in apply_megatron_patches()
    assert CheckpointWithoutOutput().fp8 is False and CheckpointWithoutOutput(fp8=None).fp8 is False
    assert CheckpointWithoutOutput(fp8="mxfp8").fp8 is True


def test_offloading_optimizer_classes_load_weights_only():
    """Workaround 11's exception: megatron's HybridDeviceOptimizer keeps its optimizer classes in its param groups,
    so its checkpoint's byte items name torch.optim.AdamW; a weights-only load takes them, and still refuses code."""
    import io
    import os

    import pytest
    import torch

    from gptoss_nemo.compat import apply_megatron_patches

    apply_megatron_patches()
    buf = io.BytesIO()
    torch.save({"param_groups": [{"cpu_optimizer_cls": torch.optim.AdamW, "lr": 1e-5}]}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["cpu_optimizer_cls"] is torch.optim.AdamW
    bad = io.BytesIO()
    torch.save({"x": os.system}, bad)
    bad.seek(0)
    with pytest.raises(Exception, match="system"):
        torch.load(bad, weights_only=True)


TOPK_SCRIPT = textwrap.dedent("""
    import sys, torch
    if sys.argv[1] == "patched":
        from gptoss_nemo.compat import apply_megatron_patches
        assert "moe_topk_sorted_without_grad" in apply_megatron_patches()
    from megatron.core.transformer.moe import router
    logits = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    route = lambda: router.topk_routing_with_score_function(logits, 4, score_function="softmax")
    with torch.no_grad():
        probs0, map0 = route()
    probs1, map1 = route()
    print(torch.equal(map0, map1), torch.equal(probs0, probs1))
""")


@pytest.mark.parametrize("mode,expected", [("bare", "True False"), ("patched", "True True")])
def test_router_probabilities_do_not_depend_on_grad_mode(mode, expected):
    """Workaround 15: megatron's router sorts its top-k only with grad on, and the softmax over the k logits then
    sums them in another order, so a recompute's no-grad first forward routes with other probabilities (last bits)
    than the forward it repeats; patched (through the name the router module imported), both are bitwise equal."""
    assert _last_line(TOPK_SCRIPT, mode) == expected


HDO_SCRIPT = textwrap.dedent("""
    import sys, torch
    if sys.argv[1] == "patched":
        from gptoss_nemo.compat import apply_megatron_patches
        assert "hybrid_optimizer_group_step" in apply_megatron_patches()
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    class GroupStepAdam(torch.optim.Optimizer):  # counts its step per param group, as TE's FusedAdam does
        def __init__(self, groups):
            super().__init__(groups, {})
        def step(self, closure=None):
            for group in self.param_groups:
                group["step"] = group.get("step", 0) + 1

    p = torch.nn.Parameter(torch.zeros(4))
    hdo = HybridDeviceOptimizer.__new__(HybridDeviceOptimizer)  # its GPU share alone (no CUDA here)
    torch.optim.Optimizer.__init__(hdo, [{"params": [p], "lr": 1.0}], {})
    hdo.param_to_inner_param = {p: p}
    hdo.cpu_optimizers = []
    hdo.param_groups[0]["step"] = 10  # what a checkpoint's load writes (megatron's DistributedOptimizer)
    hdo.gpu_optimizer = GroupStepAdam([dict(hdo.param_groups[0])])  # rebuilt from the loaded groups
    steps = []
    for _ in range(3):  # HybridDeviceOptimizer.step: groups synced to the sub-optimizers, then their step
        hdo._sync_hdo_param_groups_to_sub_optimizers()
        hdo.gpu_optimizer.step()
        steps.append(hdo.gpu_optimizer.param_groups[0]["step"])
    print(steps)
""")


@pytest.mark.parametrize("mode,expected", [("bare", "[11, 11, 11]"), ("patched", "[11, 12, 13]")])
def test_offloading_optimizer_counts_steps_on_after_a_resume(mode, expected):
    """Workaround 16: after a checkpoint's load, megatron's HybridDeviceOptimizer copied the loaded step onto its
    GPU share (TE's FusedAdam, which counts steps per param group) before every update, so every update after a
    resume used the first one's bias correction; patched, the GPU share counts on from the loaded step."""
    assert _last_line(HDO_SCRIPT, mode) == expected
