"""What every button and API endpoint does, on plain values.

`Studio` turns requests and states into new states, critiques and images by calling `img_core`; it
knows nothing of Gradio components (`ui.layout` wires those). Problems the user can fix arrive as
`IMGError` and leave as `gr.Error`, so the app keeps serving. The methods that run the models are
wrapped with `gpu_task` (ZeroGPU) on the instance, so their pickled arguments never include the
session itself.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from PIL import Image

from img_core.errors import IMGError, InvalidInputError
from img_core.images import load_image
from img_core.record import Round, SessionRecord
from img_core.session import IMGSession, StageCallback, StageEvent
from img_core.settings import LIMITS
from ui.gpu import gpu_task
from ui.models import ModelHost, Progress, no_progress
from ui.state import RoundRequest, StudioState

# ZeroGPU slot lengths in seconds (the real presets on one GPU; tiny presets need a fraction).
GENERATE_SECONDS = 90
CRITIQUE_SECONDS = 60
REFINE_SECONDS = 120


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show img_core's user-facing errors as Gradio error boxes (and client-side exceptions)."""
    try:
        yield
    except IMGError as error:
        raise gr.Error(str(error)) from error


class Studio:
    def __init__(self, host: ModelHost):
        self.host = host
        self.generate = gpu_task(GENERATE_SECONDS)(self._generate)
        self.start_from_image = gpu_task(GENERATE_SECONDS)(self._start_from_image)
        self.critique = gpu_task(CRITIQUE_SECONDS)(self._critique)
        self.refine = gpu_task(REFINE_SECONDS)(self._refine)
        self.auto_refine = gpu_task(_auto_refine_seconds)(self._auto_refine)
        self.api_generate = gpu_task(GENERATE_SECONDS)(self._api_generate)
        self.api_critique = gpu_task(CRITIQUE_SECONDS)(self._api_critique)
        self.api_refine = gpu_task(REFINE_SECONDS)(self._api_refine)

    # --- one browser session's rounds -------------------------------------------------------------

    def _generate(self, request: RoundRequest, state: StudioState, progress: Progress = no_progress) -> StudioState:
        """A new session: round 0 generated from the prompt and seed (earlier rounds are dropped)."""
        with user_errors():
            session = self.host.loaded_session(progress)
            first = session.generate(request.prompt, request.seed, request.settings, on_stage=stage_progress(progress))
            _warn(request.warnings, first)
            return state.started(first)

    def _start_from_image(
        self,
        image: Image.Image | str | None,
        request: RoundRequest,
        state: StudioState,
        progress: Progress = no_progress,
    ) -> StudioState:
        """A new session whose round 0 is the user's own image, described by the prompt."""
        with user_errors():
            if image is None:
                raise InvalidInputError("no image was uploaded: drop an image into 'Your image' first")
            image = load_image(image)
            session = self.host.loaded_session(progress)
            progress(0.0, desc="Preparing your image as round 0")
            first = session.start_from_image(image, request.prompt, request.seed)
            _warn(request.warnings, first)
            return state.started(first)

    def _critique(self, request: RoundRequest, state: StudioState, progress: Progress = no_progress) -> str:
        """The MLLM's analysis of how the base round misses the prompt (the question the round's seed draws,
        the same one the next Refine asks)."""
        with user_errors():
            base = state.base_round()
            session = self.host.loaded_session(progress)
            return session.critique(
                base.image, request.prompt, request.settings.max_critique_tokens, seed=request.seed,
                on_stage=stage_progress(progress),
            )

    def _refine(
        self, request: RoundRequest, state: StudioState, critique: str | None, progress: Progress = no_progress
    ) -> StudioState:
        """One IMG round from the base round. `critique` (possibly edited by the user) steers it in
        dialogue mode; empty means the MLLM critiques the base itself."""
        with user_errors():
            state.base_round()
            session = self.host.loaded_session(progress)
            return self._next_round(session, request, state, critique, progress)

    def _auto_refine(
        self,
        request: RoundRequest,
        state: StudioState,
        critique: str | None,
        rounds: int,
        progress: Progress = no_progress,
    ) -> Iterator[StudioState]:
        """`rounds` IMG rounds in a row, yielding the state after each. Only the first uses `critique`;
        later rounds are critiqued by the MLLM."""
        with user_errors():
            rounds = LIMITS["auto_rounds"].check("auto-refine rounds", rounds)
            state.base_round()
            session = self.host.loaded_session(progress)
            for step in range(int(rounds)):
                state = self._next_round(session, request, state, critique if step == 0 else None, progress)
                yield state

    @staticmethod
    def _next_round(
        session: IMGSession, request: RoundRequest, state: StudioState, critique: str | None, progress: Progress
    ) -> StudioState:
        """One IMG round from the base of `state`, through the session's one round path."""
        refined = session.refine(
            state.base_round(),
            request.prompt,
            request.seed,
            critique=critique,
            settings=request.settings,
            index=state.next_index,
            base_index=state.base,
            on_stage=stage_progress(progress),
        )
        _warn(request.warnings, refined)
        return state.extended(refined)

    @staticmethod
    def select(state: StudioState, index: int) -> StudioState:
        """Make round `index` the base of the next round."""
        with user_errors():
            return state.with_base(index)

    def export(self, state: StudioState) -> Path:
        """A zip of round_0.png, round_1.png, ... and session.json (the CLI's format)."""
        with user_errors():
            if state.is_empty:
                raise InvalidInputError("there is nothing to download yet: Generate an image first")
            first = state.rounds[0]
            record = SessionRecord(first.prompt, first.seed, self.host.preset.name, rounds=state.rounds)
            folder = Path(tempfile.mkdtemp(dir=_export_root()))
            return record.write_zip(folder / f"img-studio-{_slug(first.prompt)}-{time.strftime('%Y%m%d-%H%M%S')}.zip")

    # --- stateless API: /generate, /critique, /refine ---------------------------------------------

    def _api_generate(self, prompt: str, seed: int | float | None) -> Image.Image:
        """Generate the original image for `prompt` and `seed` (the preset's default settings)."""
        with user_errors():
            request = RoundRequest.from_values(prompt=prompt, seed=seed)
            session = self.host.loaded_session()
            made = session.generate(request.prompt, request.seed, request.settings)
            _warn(request.warnings, made)
            return made.image

    def _api_critique(self, image: str | Image.Image | None, prompt: str) -> str:
        """The MLLM's critique of `image` against `prompt` (the question of seed 0)."""
        with user_errors():
            request = RoundRequest.from_values(prompt=prompt, seed=0)
            image = load_image(image)
            return self.host.loaded_session().critique(image, request.prompt, seed=request.seed)

    def _api_refine(
        self, image: str | Image.Image | None, prompt: str, critique: str | None, seed: int | float | None
    ) -> Image.Image:
        """One IMG round from `image`. A non-empty `critique` steers it (dialogue mode); an empty one
        means question mode, as in the authors' release."""
        with user_errors():
            critique = _critique_or_none(critique)
            mode = "dialogue" if critique else "question"
            request = RoundRequest.from_values(prompt=prompt, seed=seed, guidance_mode=mode)
            image = load_image(image)
            session = self.host.loaded_session()
            made = session.refine(image, request.prompt, request.seed, critique=critique, settings=request.settings)
            _warn(request.warnings, made)
            return made.image


def _auto_refine_seconds(request, state, critique, rounds, progress=None) -> int:
    """ZeroGPU slot for an Auto-refine call: one refine slot per round."""
    return REFINE_SECONDS * max(1, min(int(rounds), int(LIMITS["auto_rounds"].high)))


def _warn(request_warnings: tuple[str, ...], made: Round) -> None:
    """Non-fatal notes (a prompt cut to a length limit, ...) as Gradio warnings."""
    for message in dict.fromkeys([*request_warnings, *made.warnings]):
        gr.Warning(message)


def stage_progress(progress: Progress) -> StageCallback:
    """A session `on_stage` callback that shows each stage in Gradio's progress bar."""

    def show(event: StageEvent) -> None:
        where = f"round {event.round_index}"
        if event.stage == "load":
            progress(0.0, desc=f"Loading models: {event.message}")
        elif event.step is not None and event.total:
            progress((event.step, event.total), desc=f"{where} · {event.stage}", unit="steps")
        elif event.text is None and event.stage != "done":
            progress(0.0, desc=f"{where} · {event.stage}")

    return show


def _critique_or_none(critique: str | None) -> str | None:
    critique = (critique or "").strip()
    return critique or None


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "session"


_EXPORT_ROOT: Path | None = None


def _export_root() -> Path:
    """One temporary folder per process for session zips, removed at exit (Gradio serves copies)."""
    global _EXPORT_ROOT
    if _EXPORT_ROOT is None:
        _EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="img-studio-exports-"))
        atexit.register(shutil.rmtree, _EXPORT_ROOT, ignore_errors=True)
    return _EXPORT_ROOT
