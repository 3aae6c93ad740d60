"""Graceful stop: SIGTERM (docker stop, systemd, a Space restart) ends the app without cutting anyone off.

`install(demo)` (app.py, before `launch`) makes SIGTERM:
1. refuse every model call that starts from then on (a queued click, an API call) with SHUTDOWN_MESSAGE;
2. stop the running job at its next stage event (a diffusion step, a critique token) with the same
   message, its finished rounds kept; a call without stage events (the API's one round) finishes;
3. once no model call has run for QUIET_SECONDS (queued calls answered, the last messages sent), close
   the server: `demo.launch()` returns and the exit handlers remove the app's files (`ui.files`), exit 0.
A call still running after GRACE_SECONDS cannot be stopped from outside (it is inside torch, and leaving
the interpreter under it aborts the process): the app then removes its files and exits with status 1.

Every model call passes through `tracked` (`ui.gpu.gpu_task` applies it), which counts the running
calls and does 1 and 2.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gradio as gr

from img_core.errors import IMGError

logger = logging.getLogger(__name__)

GRACE_SECONDS = 25.0  # inside the 30 s that Kubernetes and Spaces give before SIGKILL (docker: raise --time)
QUIET_SECONDS = 1.5  # no model call for this long: queued calls were answered and their messages sent
SHUTDOWN_MESSAGE = (
    "The server is shutting down (a restart or an update), so this was not run or was stopped; "
    "finished rounds are kept. Try again in a minute."
)

F = TypeVar("F", bound=Callable)

_stopping = threading.Event()
_running = 0  # model calls in progress
_changed = threading.Condition()


class ServerStopping(gr.Error, IMGError):
    """The app is shutting down. Both a gr.Error (an API client sees the message) and an IMGError (the
    page shows it as a user-facing warning, not as a failure with a traceback)."""

    def __init__(self) -> None:
        super().__init__(SHUTDOWN_MESSAGE, print_exception=False)

    def __str__(self) -> str:  # gr.Error's is the message's repr, in quotes
        return SHUTDOWN_MESSAGE


def stopping() -> bool:
    """Whether a shutdown was requested."""
    return _stopping.is_set()


def running_calls() -> int:
    """How many model calls are in progress."""
    return _running


def tracked(fn: F) -> F:
    """`fn` (a model call, possibly a generator) counted while it runs, refused once the app stops, and
    stopped at its next stage event (its `on_stage` argument) or, for a generator, its next item."""
    signature = inspect.signature(fn)
    if inspect.isgeneratorfunction(inspect.unwrap(fn)):  # unwrap: spaces.GPU wraps the generator

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Iterator:
            with _running_call():
                checked_args, checked_kwargs = _with_stop_check(signature, args, kwargs)
                for item in fn(*checked_args, **checked_kwargs):
                    yield item
                    _raise_if_stopping()

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _running_call():
            args, kwargs = _with_stop_check(signature, args, kwargs)
            return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


def request_stop() -> None:
    """Start the shutdown (steps 1 and 2 of the module docstring)."""
    _stopping.set()


def wait_until_idle(grace: float = GRACE_SECONDS, quiet: float = QUIET_SECONDS) -> bool:
    """Wait until no model call has run for `quiet` seconds; False when one still runs after `grace`."""
    deadline = time.monotonic() + grace
    with _changed:
        while True:
            while _running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                _changed.wait(left)
            idle_since = time.monotonic()
            while not _running and time.monotonic() - idle_since < quiet:
                _changed.wait(quiet - (time.monotonic() - idle_since))
            if not _running:
                return True


def install(demo: gr.Blocks, on_forced_exit: Callable[[], None]) -> None:
    """Make SIGTERM stop `demo` gracefully (call from the main thread, before `demo.launch()`).
    `on_forced_exit` runs before the exit when a call does not end within GRACE_SECONDS (the app
    removes its files there)."""

    def on_sigterm(signum: int, frame: object) -> None:
        if stopping():
            return
        print("IMG Studio: SIGTERM received: finishing or stopping the running job, then exiting", file=sys.stderr)
        request_stop()
        if not demo.is_running:  # still starting: nothing runs yet, the exit handlers clean up
            sys.exit(0)
        threading.Thread(target=close_when_idle, args=(demo, on_forced_exit), name="img-studio-shutdown",
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def close_when_idle(demo: gr.Blocks, on_forced_exit: Callable[[], None]) -> None:
    """Close the server once the model calls have ended (then `demo.launch()` returns in the main
    thread); exit with status 1 after GRACE_SECONDS if one has not."""
    if wait_until_idle():
        demo.close(verbose=False)
        return
    logger.error("a model call did not end within %.0f s of SIGTERM; exiting without it", GRACE_SECONDS)
    on_forced_exit()
    os._exit(1)


# --- inside ------------------------------------------------------------------------------------------


class _running_call:
    """Counts one model call while it runs; refuses to start one once the app stops."""

    def __enter__(self) -> None:
        global _running
        _raise_if_stopping()
        with _changed:
            _running += 1
            _changed.notify_all()

    def __exit__(self, *exc: object) -> None:
        global _running
        with _changed:
            _running -= 1
            _changed.notify_all()


def _raise_if_stopping() -> None:
    if _stopping.is_set():
        raise ServerStopping()


def _with_stop_check(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with its `on_stage` callback (if it has one) raising ServerStopping first."""
    if "on_stage" not in signature.parameters:
        return args, kwargs
    bound = signature.bind_partial(*args, **kwargs)
    report = bound.arguments.get("on_stage")
    if not callable(report):  # None: nothing reports stages (ZeroGPU pickles arguments: no closures there)
        return args, kwargs

    def on_stage(event: Any) -> None:
        _raise_if_stopping()
        report(event)

    bound.arguments["on_stage"] = on_stage
    return bound.args, bound.kwargs
