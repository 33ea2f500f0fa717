"""The megatron-core expert-bias patch: the installed bug reproduces on CPU, and the patch fixes it."""

import os
import subprocess
import sys
import textwrap

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


def _run(mode: str, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(port)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_bug_present_in_installed_megatron_and_patch_fixes_it():
    bare = _run("bare", 29621)
    patched = _run("patched", 29622)
    assert "backward ok" in patched.stdout, patched.stderr[-2000:]
    if "patches []" in patched.stdout:  # a megatron-core without the bug: nothing patched, and none needed
        assert bare.returncode == 0, bare.stderr[-2000:]
        return
    assert "patches ['expert_bias_inplace_add']" in patched.stdout
    assert bare.returncode != 0 and "is a view and is being modified inplace" in bare.stderr
