"""`--compile`: the training forward (and so its backward) through torch.compile.

Only stages that run the network compile: a head on cached features is one small layer, and
evaluation passes are too few per run to repay a compile of their own (each mode is a graph of its
own). The first batch of such a stage pays the compile; a later stage with other trainable layers,
another crop size or a last smaller batch may compile again. Off by default: on a 2-core CPU it
made the train step slower, not faster (README, "torch.compile").
"""

from __future__ import annotations

from typing import Callable

import torch
import torch._dynamo.exc
import torch._inductor.exc
from torch import nn

from thaw.errors import ThawError

MAX_REASON = 300  # characters of the compiler's message in thaw's one line
# What a failed compile raises: dynamo's own errors (inductor's arrive wrapped in them), and a missing
# or failing C++ compiler, which inductor needs on the CPU.
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InvalidCxxCompiler, torch._inductor.exc.CppCompileError)


def compiled_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """`module`'s forward through torch.compile; a compile that fails becomes one line that says what to do."""
    compiled = torch.compile(module)

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        try:
            return compiled(*inputs)
        except COMPILE_ERRORS as error:
            raise ThawError(
                f"torch.compile failed ({_reason(error)}); train without --compile (a run stopped here continues with "
                "thaw train --resume RUN, without --compile)"
            ) from None

    return forward


def _reason(error: Exception) -> str:
    """The failure in one short line: the backend's own error where dynamo wraps one (a missing compiler, say)."""
    inner = getattr(error, "inner_exception", None) or error
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else 'no message'}"[:MAX_REASON]
