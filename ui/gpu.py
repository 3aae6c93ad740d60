"""Hugging Face ZeroGPU support without depending on it.

`gpu_task(duration)` wraps a function with `spaces.GPU(duration=...)` when the `spaces` package is
importable; `spaces.GPU` itself does nothing unless the Space runs on ZeroGPU (`SPACES_ZERO_GPU` set).
On ZeroGPU the wrapped function runs in a forked worker: its arguments and return value are pickled,
so wrapped functions take and return plain values (requests, states, images, text), never the session
or Gradio components; the models are reached through the object the function is bound to, which the
fork inherits. Every wrapped call is also `ui.shutdown.tracked`: SIGTERM waits for it, refuses new ones
and stops a running one at its next step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

try:  # imported before torch on purpose: ZeroGPU patches CUDA initialisation
    import spaces
except ImportError:
    spaces = None

from ui.shutdown import tracked  # noqa: E402  (after `spaces`, which must come before torch)

F = TypeVar("F", bound=Callable)


def on_zero_gpu() -> bool:
    """True on a Hugging Face ZeroGPU Space, where models must be loaded at start-up, not per call."""
    return spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))


def gpu_task(duration: int | Callable[..., int]) -> Callable[[F], F]:
    """Decorator: request a ZeroGPU slot of `duration` seconds per call where that applies (a callable
    gets the call's arguments and returns the seconds); the call is `tracked` for a graceful stop (in
    this process: on ZeroGPU the slot's forked worker runs inside it)."""

    def wrap(fn: F) -> F:
        return tracked(fn if spaces is None else spaces.GPU(duration=duration)(fn))

    return wrap
