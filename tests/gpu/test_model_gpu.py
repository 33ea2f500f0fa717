"""GPU tier for the model definition: the tiny checkpoint's config builds the megatron model ($GPU_TESTS_IMPL), and a
forward+backward pass trains the router through the load-balancing loss and the attention sinks.

Prints `RESULT ...` lines (collected into tests/gpu/RESULTS.md)."""

import pytest
import torch
from launch import IMPL

from gptoss_nemo.checkpoint.tiny import write_tiny_checkpoint
from gptoss_nemo.model.build import build_model, transformer_config
from gptoss_nemo.model.hf_config import GptOssConfig
from gptoss_nemo.model.megatron_config import RouterConfig
from gptoss_nemo.model.param_count import count_parameters
from gptoss_nemo.model.presets import tiny

pytestmark = pytest.mark.gpu
SEQ, BATCH = 512, 2


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "tiny", tiny(), seed=0, tokenizer=False)
    return GptOssConfig.from_file(path)


def _model(cfg, router=None):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1234)  # same initial weights for every model a test builds
    tc = transformer_config(cfg, router or RouterConfig(), IMPL)
    return build_model(cfg, tc)


def _batch(cfg, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), device="cuda", generator=gen)
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(BATCH, -1)
    return ids[:, :-1], pos, ids[:, 1:]


def _window(attention):
    """The attention's window as megatron's (w, 0), None for full causal attention (TE says (-1, 0))."""
    softmax = getattr(attention, "scale_mask_softmax", None)
    window = softmax.window_size if softmax is not None else attention.window_size
    return None if window is None or tuple(window)[0] < 0 else tuple(window)


def _router_and_sinks(model):
    routers = [layer.mlp.router.weight for layer in model.decoder.layers]
    sinks = [layer.self_attention.core_attention.softmax_offset for layer in model.decoder.layers]
    return routers, sinks


def test_builds_with_expected_structure(megatron_parallel, cfg):
    model = _model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg).total, (n, count_parameters(cfg).total)
    windows = [_window(layer.self_attention.core_attention) for layer in model.decoder.layers]
    assert windows == [(127, 0) if s else None for s in cfg.sliding_layers]
    _, sinks = _router_and_sinks(model)
    assert all(s.shape == (cfg.num_attention_heads,) for s in sinks)
    # The conversion table names exactly the parameters megatron built (no more, no fewer).
    from gptoss_nemo.convert.mapping import check_names, megatron_param_names
    from gptoss_nemo.parallel.layout import LayerIndex

    index = LayerIndex(0, cfg.num_hidden_layers, 0, cfg.num_local_experts)
    expected = megatron_param_names(index, te=IMPL == "te", pre_process=True, post_process=True)
    check_names(expected, {name for name, _ in model.named_parameters()}, f"megatron {IMPL} model")
    print(f"RESULT build ({IMPL}): tiny params={n} (analytic {count_parameters(cfg).total}), windows={windows}")


def test_sliding_window_mask_matches_transformers(megatron_parallel, cfg):
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    masked = get_sliding_window_causal_mask(SEQ, SEQ, (cfg.sliding_window - 1, 0)).cpu()  # True = masked
    q, k = torch.arange(SEQ).unsqueeze(1), torch.arange(SEQ).unsqueeze(0)
    hf_allowed = (k <= q) & (k > q - cfg.sliding_window)  # transformers' sliding_window_overlay & causal
    assert torch.equal(~masked, hf_allowed)
    assert int(hf_allowed[SEQ - 1].sum()) == cfg.sliding_window


def test_yarn_rope_matches_transformers(megatron_parallel, cfg):
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    model = _model(cfg)
    emb, mscale = model.rotary_pos_emb(SEQ)  # YaRN returns the angles and the attention factor
    half = cfg.head_dim // 2
    ours_cos = (emb.float().cos() * mscale).reshape(SEQ, -1)[:, :half]
    hf_rope = GptOssRotaryEmbedding(HFConfig(**cfg.to_dict()), device="cuda")
    x = torch.zeros(1, SEQ, cfg.head_dim, device="cuda")
    cos, _sin = hf_rope(x, torch.arange(SEQ, device="cuda").unsqueeze(0))
    err = (ours_cos - cos[0].float()[:, :half]).abs().max().item()
    print(f"RESULT yarn: max |cos_megatron - cos_hf| = {err:.2e}, attention factor {mscale:.4f}")
    assert err < 1e-4


def test_forward_backward_trains_router_with_aux_loss_and_sinks(megatron_parallel, cfg):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    model = _model(cfg)
    ids, pos, labels = _batch(cfg)
    get_moe_metrics_tracker().metrics.clear()
    loss = model(ids, pos, attention_mask=None, labels=labels)  # [b, s] per-token LM loss
    assert loss.shape == (BATCH, SEQ) and torch.isfinite(loss).all()
    lm = loss.float().mean()
    lm.backward()
    routers, sinks = _router_and_sinks(model)
    router_norm = [r.grad.float().norm().item() for r in routers]
    sink_norm = [s.grad.float().norm().item() for s in sinks]
    balance = get_moe_metrics_tracker().metrics["load_balancing_loss"].values.float().cpu()
    print(f"RESULT fwd+bwd: lm_loss={lm.item():.4f} (ln V = {torch.log(torch.tensor(cfg.vocab_size * 1.0)):.4f}) "
          f"load_balancing_loss per layer={[round(v, 4) for v in balance.tolist()]} "
          f"router grad norms={[f'{v:.2e}' for v in router_norm]} sink grad norms={[f'{v:.2e}' for v in sink_norm]}")
    assert all(v > 0 for v in router_norm) and all(v > 0 for v in sink_norm)
    assert len(balance) == cfg.num_hidden_layers and (balance > 0).all()


def test_aux_loss_alone_moves_the_router(megatron_parallel, cfg):
    """With the LM loss multiplied by 0, router gradients can only come from the load-balancing loss."""
    grads = {}
    for coeff in (1e-2, 1e-3):
        model = _model(cfg, RouterConfig(aux_loss_coeff=coeff))
        ids, pos, labels = _batch(cfg)
        (model(ids, pos, attention_mask=None, labels=labels).float().mean() * 0).backward()
        routers, _ = _router_and_sinks(model)
        grads[coeff] = sum(r.grad.float().norm().item() for r in routers)
        out_grad = model.output_layer.weight.grad
        assert out_grad is None or out_grad.abs().max().item() == 0  # no LM gradient flowed
    print(f"RESULT aux-only router grad norm: coeff 1e-2 -> {grads[1e-2]:.3e}, 1e-3 -> {grads[1e-3]:.3e}")
    assert grads[1e-3] > 0
    assert grads[1e-2] / grads[1e-3] == pytest.approx(10.0, rel=0.05)  # linear in the coefficient


def test_te_extra_state_from_a_checkpoint_runs_no_code():
    """A TE module's `_extra_state` from a checkpoint never unpickles a callable: TE 2.20 refuses any pickled extra
    state that is not empty unless NVTE's unsafe opt-in is set; older TE (plain pickle.loads) gets compat 12,
    megatron's allowlist. BF16 extra state (empty) loads either way."""
    import pickle

    from gptoss_nemo.model.impl import te_problem

    if te_problem():
        pytest.skip(te_problem())
    import transformer_engine.pytorch as te
    from transformer_engine.pytorch.module import base

    from gptoss_nemo.compat import apply_megatron_patches

    patched = "te_extra_state_unpickle" in apply_megatron_patches()
    upstream_guard = hasattr(base, "should_load_extra_state_pickle")
    assert patched or upstream_guard
    linear = te.Linear(64, 64, params_dtype=torch.bfloat16)
    linear.set_extra_state(linear.get_extra_state())  # BF16: empty

    class _RunsCode:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = torch.frombuffer(bytearray(pickle.dumps({"forward": _RunsCode()})), dtype=torch.uint8)
    with pytest.raises((pickle.UnpicklingError, RuntimeError)) as refused:
        linear.set_extra_state(evil)
    print(f"RESULT TE extra state: compat 12 applied={patched}, TE's own guard={upstream_guard}; a pickled callable "
          f"refused: {str(refused.value).splitlines()[0][:120]}")
