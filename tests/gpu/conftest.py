"""GPU tier: skipped without CUDA. One process; megatron's parallel state is set up once for the session."""

import os

import pytest
import torch


def pytest_runtest_logreport(report):
    """A failure's report at once, not at the session's end: a device call's time limit may cut that end off."""
    if report.failed:
        print(f"\nFAILURE {report.nodeid} ({report.when}):\n{report.longreprtext[-5000:]}\n", flush=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU tier: needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_parallel():
    """TP=PP=EP=1 on one GPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29731 + int(os.environ.get("GPU_TESTS_PORT_OFFSET", "0"))))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny MXFP4 gpt-oss checkpoint with o200k_harmony tokenizer files (tiny_ckpt.py)."""
    from tiny_ckpt import checkpoint_with_tokenizer

    from gptoss_nemo.model.presets import tiny

    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("tiny-tok") / "tiny-mxfp4", tiny())


@pytest.fixture(scope="session")
def imported_tiny(tiny_with_tokenizer, tmp_path_factory):
    """The tiny gpt-oss imported into a gptoss-nemo checkpoint (one GPU, local spec; one process on a free port)."""
    from launch import IMPL_ARGS, run_python

    out = tmp_path_factory.mktemp("sft") / "tiny-ckpt"
    run_python("-m", "gptoss_nemo", "import", str(tiny_with_tokenizer), str(out), *IMPL_ARGS)
    return out


@pytest.fixture(scope="session")
def sft_run(imported_tiny, tmp_path_factory):
    """One GPU, 200 SFT steps of the tiny model on the shipped arithmetic task (the SFT tests check it; the QAT
    tests start from its last checkpoint). Returns the run directory."""
    from launch import stage_args, torchrun

    out = tmp_path_factory.mktemp("sft-run") / "run"
    torchrun(1, *stage_args("sft", imported_tiny, out, "train.steps=200", "train.eval_every=50",
                            "train.save_every=100"), port=29851, timeout=400)
    return out
