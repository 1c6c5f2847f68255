"""`--compile`: the training forward (and so its backward) through torch.compile.

Only stages that run the network compile: a head on cached features is one small layer, and
evaluation passes are too few per run to repay a compile of their own (each mode is a graph of its
own). The first batch of such a stage pays the compile; the epoch's last, smaller batch or another
crop size may compile again. Off by default: on a 2-core CPU it made the train step slower, not
faster (README, Speed: `--compile`). Image models only for now: text batches vary in length, and
nothing was measured on them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from thaw.errors import ThawError

MAX_REASON = 300  # characters of the compiler's message in thaw's one line


def compile_problem(device: torch.device, task: str) -> str | None:
    """Why --compile cannot run here, or None; asked before any training, so that a missing compiler does not
    surface only after the head stage."""
    import torch._dynamo

    if task == "text":
        return "--compile is for image models (text batches vary in length, and it was not measured on them); leave it unset for text"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform; train without --compile"
    if device.type == "cpu":  # inductor writes C++ for the CPU
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            return "torch.compile needs a C++ compiler on the CPU and found none (install g++ or set CXX), or train without --compile"
    return None


class CompileFailed(ThawError):
    """torch.compile failed, said in one line; where a stop (Ctrl-C, SIGTERM) ended its compiler, the run says the
    stop instead (Trainer.fit), with `reason`."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def compile_failures() -> tuple[type[BaseException], ...]:
    """What torch raises where a compile fails: dynamo's own errors (inductor's arrive wrapped in them, from the
    forward or, compiled lazily, the backward), and a failing C++ compiler."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InvalidCxxCompiler, torch._inductor.exc.CppCompileError)


def compile_failed(error: BaseException) -> CompileFailed:
    reason = _reason(error)
    return CompileFailed(
        f"torch.compile failed ({reason}; TORCHDYNAMO_VERBOSE=1 shows torch's own trace); train without "
        "--compile (the epochs checkpointed so far stay: thaw train --resume RUN, without --compile, continues)",
        reason,
    )


def compiled_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """`module`'s forward through torch.compile, for one stage; a compile that fails becomes one line that says what to do.

    Each stage starts from an empty cache: the last stage's graphs (other layers trained) never match again, and
    their recompiles would count against dynamo's limit, past which it silently runs eager.
    """
    import torch._dynamo

    failures = compile_failures()
    torch._dynamo.reset()
    compiled = torch.compile(module)

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        try:
            return compiled(*inputs)
        except failures as error:
            raise compile_failed(error) from None

    return forward


def _reason(error: Exception) -> str:
    """The failure in one short line: the backend's own error where dynamo wraps one (a failing compiler, say)."""
    inner = getattr(error, "inner_exception", None) or error
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else 'no message'}"[:MAX_REASON]
