"""Hugging Face ZeroGPU support without depending on it: one bounded, streamed GPU call per round.

On ZeroGPU (`SPACES_ZERO_GPU` set, the `spaces` package installed) a function decorated with `spaces.GPU`
runs in a forked worker that holds a GPU for at most `duration` seconds; its arguments and results are
pickled, and no callback crosses the fork. So every model action of the app is one such call:

  * `gpu_task(action, preset)` wraps a Studio method `f(..., on_stage=None) -> value`. On ZeroGPU the
    method runs inside a generator GPU function that yields each StageEvent it reports (diffusion steps,
    the critique token by token) and then its value; in the main process the wrapper hands the events to
    the caller's `on_stage` as they arrive and returns the value. Stop works as everywhere else: the
    caller's `on_stage` raises StopRequested, which closes the stream and ends the GPU call.
  * Auto-refine is a loop of one-round calls in the main process (`ui.handlers.Studio._auto_refine`), so
    no call outlasts one round and Stop is honoured between rounds.
  * `gpu_seconds` gives each call's duration from the preset (at most `MAX_GPU_SECONDS`); `gpu_size` the
    slice (`large`, 48 GB, or `xlarge`, 96 GB at twice the quota) from the preset's memory estimate, and
    `zero_gpu_precision` the MLLM's quantization on that slice (app.py passes it to the session).

Off ZeroGPU (`spaces` missing, or `SPACES_ZERO_GPU` unset) every decorator returns the function itself.
`streamed_call` is the wrapped form without `spaces`, so tests run the same per-call code path offline.

Every call of a decorated function is also `ui.shutdown.tracked`: SIGTERM waits for it, refuses new
ones and stops a running one at its next step.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

try:  # imported before torch on purpose: ZeroGPU patches CUDA initialisation
    import spaces
except ImportError:
    spaces = None

from img_core.mllm.quantization import (  # noqa: E402  (after `spaces`, which must come before torch)
    GPU_HEADROOM_GIB,
    PrecisionChoice,
    choose_quantization,
    preset_other_gib,
)
from img_core.presets import Preset  # noqa: E402
from ui.shutdown import tracked  # noqa: E402

F = TypeVar("F", bound=Callable)

# Seconds one GPU call asks for, per action and preset family (estimates for a 48 GB slice: SDXL 50 steps
# at 1024 px ~15 s, FLUX 30 steps with true CFG ~60 s, a 13B critique of 96 tokens ~5 s, plus loading the
# worker). ZeroGPU's default is 60 s; shorter requests queue first, and a call is refused when it asks for
# more than the visitor's remaining daily quota (2 minutes unauthenticated, 5 free, 40 PRO).
GPU_SECONDS: dict[str, dict[str, int]] = {
    "sdxl": {"generate": 60, "critique": 30, "refine": 90},
    "flux": {"generate": 90, "critique": 30, "refine": 120},
    "tiny": {"generate": 30, "critique": 30, "refine": 30},
}
MAX_GPU_SECONDS = 120  # no call asks for more: longer requests are refused in public reports (300 s)
# GPU memory of ZeroGPU's slices (GiB): `large` is half an RTX Pro 6000 (48 GB; the `spaces` package moves
# a workload to `xlarge` above 45097156608 bytes), `xlarge` the whole card (96 GB).
GPU_SIZE_GIB = {"large": 45097156608 / 1024**3, "xlarge": 101973950464 / 1024**3}


def on_zero_gpu() -> bool:
    """True on a Hugging Face ZeroGPU Space, where models must be loaded at start-up, not per call."""
    return spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))


def gpu_seconds(action: str, preset: Preset) -> int:
    """The duration one `action` call ("generate", "critique", "refine") asks for with `preset`."""
    family = "tiny" if preset.is_tiny else preset.family
    return min(GPU_SECONDS[family][action], MAX_GPU_SECONDS)


def gpu_size(preset: Preset) -> str:
    """`large` (48 GB, the default, 1x quota) when the preset fits it at its defaults (memory table), else
    `xlarge` (96 GB, twice the quota). The MLLM's precision then follows the slice (`zero_gpu_precision`)."""
    return "large" if preset.resident_gib + GPU_HEADROOM_GIB <= GPU_SIZE_GIB["large"] else "xlarge"


def zero_gpu_precision(preset: Preset) -> PrecisionChoice:
    """The MLLM quantization for `preset` on its ZeroGPU slice: no GPU is attached at start-up to measure,
    so the slice's memory counts (`large`: bf16 LLaVA beside SDXL, 8-bit beside nf4 FLUX)."""
    other = preset_other_gib(preset.mllm, preset.resident_gib)
    return choose_quantization(preset.mllm, "cuda", total_gib=GPU_SIZE_GIB[gpu_size(preset)], other_gib=other)


def gpu_task(action: str, preset: Preset) -> Callable[[F], F]:
    """Decorator: on ZeroGPU, each call of the decorated `f(..., on_stage=None)` is one streamed GPU call of
    `gpu_seconds(action, preset)` on a `gpu_size(preset)` slice (see the module doc); elsewhere `f` itself."""

    def wrap(fn: F) -> F:
        if not on_zero_gpu():
            return tracked(fn)
        gpu_call = spaces.GPU(duration=gpu_seconds(action, preset), size=gpu_size(preset))(stream_events(fn))
        return tracked(streamed_call(fn, gpu_call))

    return wrap


# --- the streamed call, with and without spaces ---------------------------------------------------------

_EVENT, _VALUE, _ERROR = "event", "value", "error"


class StreamClosed(Exception):
    """Raised inside a GPU call's work when its caller stopped reading the stream (Stop, a closed page)."""


def stream_events(fn: Callable[..., Any]) -> Callable[..., Iterator[tuple[str, Any]]]:
    """The generator function that runs in the GPU worker: `fn(*args, on_stage=..., **kwargs)` in a thread,
    yielding ("event", StageEvent) as it reports and finally ("value", result). An exception of `fn` is
    raised from the generator (ZeroGPU hands user errors, gr.Error, back to the page)."""

    reports = "on_stage" in inspect.signature(fn).parameters

    def events(*args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        items: queue.Queue = queue.Queue()
        closed = threading.Event()

        def on_stage(event: Any) -> None:
            if closed.is_set():  # the caller stopped reading (Stop): end the work at its next step
                raise StreamClosed("the caller stopped reading")
            items.put((_EVENT, event))

        def work() -> None:
            try:
                items.put((_VALUE, fn(*args, **kwargs, **({"on_stage": on_stage} if reports else {}))))
            except BaseException as error:  # handed to the generator, which raises it
                items.put((_ERROR, error))

        worker = threading.Thread(target=work, name="img-studio-gpu-call", daemon=True)
        worker.start()
        try:
            while True:
                kind, item = items.get()
                if kind == _ERROR:
                    raise item
                yield kind, item
                if kind == _VALUE:
                    return
        finally:
            closed.set()

    functools.update_wrapper(events, fn)
    return events


def streamed_call(fn: F, gpu_call: Callable[..., Iterator[tuple[str, Any]]]) -> F:
    """`fn`'s signature, run as `gpu_call` (a `stream_events` generator, maybe behind `spaces.GPU`): the
    events go to the caller's `on_stage` as they arrive, the value is returned. An exception raised by
    `on_stage` (Stop) closes the stream, which ends the GPU call."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        on_stage = bound.arguments.pop("on_stage", None)
        stream = gpu_call(*bound.args, **bound.kwargs)
        result = None
        try:
            for kind, item in stream:
                if kind == _EVENT:
                    if on_stage is not None:
                        on_stage(item)
                else:
                    result = item
        finally:
            stream.close()
        return result

    return call  # type: ignore[return-value]
