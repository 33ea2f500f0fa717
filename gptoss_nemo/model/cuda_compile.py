"""torch.compile for the fused local kernels: compiled when called on CUDA tensors, the plain function on the CPU
(the CPU tests; flex attention has no compiled CPU backward), compiled once, on the first CUDA call."""

from __future__ import annotations

import functools

import torch

# A process that trains and evaluates compiles a kernel per shape (and per mask kind for flex attention): past
# dynamo's default limit of 8 recompilations a function silently runs uncompiled.
RECOMPILE_LIMIT = 64


def compiled_on_cuda(**options):
    """Decorator: `fn` under torch.compile(**options) when its first argument is a CUDA tensor, else `fn` itself."""

    def wrap(fn):
        @functools.cache
        def compiled():
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            return torch.compile(fn, **options)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return (compiled() if args[0].is_cuda else fn)(*args, **kwargs)

        return call

    return wrap
