"""The process's one IMG session, shared by every browser session.

Models load once per process, lazily on the first click that needs them (or at start-up on ZeroGPU),
never per click. Switching preset, MLLM or quantization replaces the models for every user of this
process, so it is refused unless the app was started with `--allow-model-switch` (checked here, on the
server, not only by hiding the button: any client can send the event over HTTP); the replacement is
loaded at once, and if it fails the previous session stays.
"""

from __future__ import annotations

import gc
import threading
import time

from img_core.errors import InvalidInputError
from img_core.mllm import KNOWN_MLLMS, default_quantization
from img_core.presets import get_preset
from img_core.session import IMGSession, StageCallback


def compatible_mllms(preset_name: str) -> list[str]:
    """The MLLMs a preset's aligner can take guidance from: same guidance width, and tiny with tiny."""
    preset = get_preset(preset_name)
    own = KNOWN_MLLMS[preset.mllm]
    return [name for name, spec in KNOWN_MLLMS.items() if spec.hidden_size == own.hidden_size and spec.tiny == own.tiny]


class ModelSwitchNotAllowedError(InvalidInputError):
    """A model switch was asked of an app started without `--allow-model-switch`."""


class ModelHost:
    def __init__(self, session: IMGSession, allow_switch: bool = False):
        self._session = session
        self.allow_switch = allow_switch  # app.py's --allow-model-switch
        self._lock = threading.RLock()
        self.load_seconds: float | None = None

    @property
    def session(self) -> IMGSession:
        return self._session

    @property
    def preset(self):
        return self._session.base_preset

    @property
    def quantization(self) -> str:
        """The MLLM quantization in effect (as loaded, else the requested one, else the device's default)."""
        chosen = self._session.mllm_precision
        return chosen.quantization if chosen else self._session.quantization or default_quantization(self._session.device)

    @property
    def is_loaded(self) -> bool:
        return self._session.is_loaded

    def loaded_session(self, on_stage: StageCallback | None = None) -> IMGSession:
        """The session with every model loaded; loads them on the first call in this process, reporting
        `Stage.LOAD` events (step k of n) to `on_stage`."""
        with self._lock:
            if not self._session.is_loaded:
                start = time.perf_counter()
                self._session.load(on_stage=on_stage)
                self.load_seconds = time.perf_counter() - start
            return self._session

    def switch(
        self, preset_name: str, mllm: str | None, quantization: str | None, on_stage: StageCallback | None = None
    ) -> bool:
        """Replace the session with one for these settings and load it. Returns False (and loads
        nothing) when they are the current ones; on failure the current session stays and the error
        propagates. Refused (ModelSwitchNotAllowedError) unless the host allows switching."""
        if not self.allow_switch:
            raise ModelSwitchNotAllowedError(
                "switching models is turned off on this server (it would change the models for every user): "
                "start the app with --allow-model-switch to allow it"
            )
        with self._lock:
            current = self._session
            quantization = quantization or None
            mllm = mllm or get_preset(preset_name).mllm
            unchanged = (
                preset_name == current.base_preset.name
                and mllm == current.mllm_name
                and (quantization or default_quantization(current.device)) == self.quantization
            )
            if unchanged:
                return False
            same_preset = preset_name == current.base_preset.name
            # The other options (device, offload as asked, diffusion quantization, questions) are the process's
            # command line and stay; an --aligner belongs to its preset.
            replacement = current.with_options(
                preset=preset_name, mllm=mllm, quantization=quantization,
                aligner=current.options.aligner if same_preset else None,
            )
            previous = current.with_options()  # the old settings, unloaded: what a failed switch goes back to
            self._session = replacement
            self.load_seconds = None
            del current  # free the old models before loading the new ones
            gc.collect()
            _empty_accelerator_cache()
            try:
                self.loaded_session(on_stage)
            except BaseException:
                self._session = previous  # back to the old settings, loaded lazily
                raise
            return True

    def status_line(self) -> str:
        session = self._session
        where = (
            f"**{self.preset.name}** on `{session.device}`, MLLM `{session.mllm_name}` "
            f"(quantization: {self.quantization})"
        )
        if session.is_loaded:
            took = f" in {self.load_seconds:.1f} s" if self.load_seconds is not None else ""
            return f"Models: {where} — loaded{took}."
        return f"Models: {where} — not loaded yet; they load on the first click that needs them, once per process."


def _empty_accelerator_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
