"""What every button and API endpoint does, on plain values.

`Studio` turns requests and states into new states, critiques and images by calling `img_core`; it
knows nothing of Gradio components (`ui.layout` wires those). Problems the user can fix arrive as
`IMGError` and leave as `gr.Error`, so the app keeps serving. The methods that run the models are
wrapped with `gpu_task` (ZeroGPU) on the instance, so their pickled arguments never include the
session itself.
"""

from __future__ import annotations

import contextlib
import re
import shutil
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
from ui.files import app_subfolder
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

    def export(self, state: StudioState, session_id: str = "default") -> Path:
        """A zip of round_0.png, round_1.png, ... and session.json (the CLI's format). One file per browser
        session (`session_id`, Gradio's session hash): each download replaces the previous one, and
        `end_session` removes it."""
        with user_errors():
            if state.is_empty:
                raise InvalidInputError("there is nothing to download yet: Generate an image first")
            first = state.rounds[0]
            record = SessionRecord(first.prompt, first.seed, self.host.preset.name, rounds=state.rounds)
            folder = _export_folder(session_id)
            for old in folder.iterdir():
                old.unlink(missing_ok=True)
            return record.write_zip(folder / f"img-studio-{_slug(first.prompt)}-{time.strftime('%Y%m%d-%H%M%S')}.zip")

    @staticmethod
    def end_session(session_id: str) -> None:
        """Remove what `export` wrote for a browser session that has ended."""
        shutil.rmtree(_export_folder(session_id), ignore_errors=True)

    # --- stateless API: /generate, /critique, /refine ---------------------------------------------

    def _api_generate(self, prompt: object, seed: object) -> Image.Image:
        """Generate the original image for `prompt` and `seed` (the preset's default settings)."""
        with user_errors():
            request = RoundRequest.from_values(prompt=prompt, seed=seed)
            session = self.host.loaded_session()
            made = session.generate(request.prompt, request.seed, request.settings)
            _api_warn(request.warnings, made.warnings)
            return made.image

    def _api_critique(self, image: bytes | str | Image.Image | None, prompt: object) -> str:
        """The MLLM's critique of `image` (an upload, see `_api_image`) against `prompt` (the question of seed 0)."""
        with user_errors():
            request = RoundRequest.from_values(prompt=prompt, seed=0)
            image = load_image(_api_image(image))
            text = self.host.loaded_session().critique(image, request.prompt, seed=request.seed)
            _api_warn(request.warnings)
            return text

    def _api_refine(
        self, image: bytes | str | Image.Image | None, prompt: object, critique: object, seed: object
    ) -> Image.Image:
        """One IMG round from `image` (an upload, see `_api_image`). A non-empty `critique` steers it
        (dialogue mode); an empty one means question mode, as in the authors' release."""
        with user_errors():
            if critique is not None and not isinstance(critique, str):
                raise InvalidInputError(f"the critique must be text (or empty), got {type(critique).__name__}")
            critique = _critique_or_none(critique)
            mode = "dialogue" if critique else "question"
            request = RoundRequest.from_values(prompt=prompt, seed=seed, guidance_mode=mode)
            image = load_image(_api_image(image))
            session = self.host.loaded_session()
            made = session.refine(image, request.prompt, request.seed, critique=critique, settings=request.settings)
            _api_warn(request.warnings, made.warnings)
            return made.image


def _api_warn(*groups: tuple[str, ...] | list[str]) -> None:
    """Non-fatal notes (a prompt cut to the length limit, ...) as Gradio warnings, each once: an API client
    sees them in the event's log messages."""
    for message in dict.fromkeys(message for group in groups for message in group):
        gr.Warning(message)


def _api_image(image: object) -> bytes | str | Path | Image.Image | None:
    """The image as `load_image` takes it. Over HTTP the API gets Gradio's record of the upload (a dict whose
    path Gradio has checked is in its upload cache); its bytes are read here, so no server path reaches a
    message. In-process callers may pass a path, bytes or a PIL image."""
    if isinstance(image, dict) and isinstance(image.get("path"), str):
        try:
            return Path(image["path"]).read_bytes()
        except OSError as error:
            raise InvalidInputError("the uploaded file could not be read; upload it again") from error
    if image is not None and not isinstance(image, (bytes, bytearray, str, Path, Image.Image)):
        raise InvalidInputError("the image must be an uploaded file (gradio_client: handle_file(path))")
    return image


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


def _export_folder(session_id: str) -> Path:
    """The folder of one browser session's zip, inside the app's folder (`ui.files`)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", session_id)[:64] or "default"
    folder = app_subfolder("exports") / safe
    folder.mkdir(exist_ok=True)
    return folder
