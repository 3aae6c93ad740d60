"""What every button and API endpoint does, on plain values.

`Studio` turns requests and states into new states, critiques and images by calling `img_core`'s one
round path and scores each round; it knows nothing of Gradio components (`ui.layout` wires those). The
page's methods raise `IMGError` for what the user can fix (the layout shows it and keeps the page
usable); the stateless API methods turn it into `gr.Error`. The methods that run the models are
wrapped with `gpu_task` (ZeroGPU) on the instance, so their pickled arguments never include the
session itself (`ui.jobs` runs them beside the page). `ModelPreparation` loads the models in the
background so the page shows at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from PIL import Image

from img_core.errors import IMGError, InvalidInputError
from img_core.evaluation.scorers import VQA_SCORER, check_scorer_names
from img_core.images import load_image
from img_core.record import Round, SessionRecord
from img_core.session import LOAD_STEPS, IMGSession, Stage, StageCallback, StageEvent
from img_core.settings import LIMITS, CheckedPrompt
from ui.files import app_subfolder
from ui.gpu import gpu_task
from ui.image_files import png_file
from ui.models import ModelHost
from ui.shutdown import ServerStopping, tracked
from ui.state import RoundRequest, StudioState
from ui.views import public_text

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show img_core's user-facing errors as Gradio error boxes (and client-side exceptions)."""
    try:
        yield
    except IMGError as error:
        logger.info("refused: %s", error)  # a user mistake: one line, no traceback in the server log
        raise gr.Error(public_text(str(error)), print_exception=False) from error


class Studio:
    def __init__(self, host: ModelHost, scorer: str | None = VQA_SCORER):
        """`scorer`: the name (img_core.evaluation.scorers) that scores every round; None or "none": no scores."""
        self.host = host
        self.scorer_name = check_scorer_names([scorer])[0] if scorer and scorer != "none" else None
        preset = host.preset  # ZeroGPU: one bounded call per action (ui/gpu.py); Auto-refine loops `refine`
        self.generate = gpu_task("generate", preset)(self._generate)
        self.start_from_image = gpu_task("generate", preset)(self._start_from_image)
        self.critique = gpu_task("critique", preset)(self._critique)
        self.refine = gpu_task("refine", preset)(self._refine)
        self.auto_refine = self._auto_refine
        self.example_first_round = gpu_task("generate", preset)(self._example_first_round)
        self.example_next_round = gpu_task("refine", preset)(self._example_next_round)
        self.api_generate = gpu_task("generate", preset)(self._api_generate)
        self.api_critique = gpu_task("critique", preset)(self._api_critique)
        self.api_refine = gpu_task("refine", preset)(self._api_refine)

    # --- one browser session's rounds -------------------------------------------------------------
    # These raise IMGError for what the user can fix; `ui.layout` shows it and keeps the page usable.
    # `on_stage` receives the session's StageEvents (plus "score"); it may raise StopRequested.

    def _generate(
        self, request: RoundRequest, state: StudioState, on_stage: StageCallback | None = None
    ) -> StudioState:
        """A new session: round 0 generated from the prompt and seed (earlier rounds are dropped)."""
        report = on_stage or _ignore
        session = self._loaded(report)
        prompt = session.check_prompt(request.checked_prompt)  # once per click
        first = session.generate(prompt, request.seed, request.settings, on_stage=report)
        first = self._scored(session, _with_warnings(first, request.warnings), report)
        return state.started(first)

    def _start_from_image(
        self,
        image: Image.Image | str | None,
        request: RoundRequest,
        state: StudioState,
        on_stage: StageCallback | None = None,
    ) -> StudioState:
        """A new session whose round 0 is the user's own image, described by the prompt."""
        if image is None:
            raise InvalidInputError("no image was uploaded: drop an image into 'Your image' first")
        image = load_image(image)
        report = on_stage or _ignore
        session = self._loaded(report)
        first = session.start_from_image(image, session.check_prompt(request.checked_prompt), request.seed)
        first = self._scored(session, _with_warnings(first, request.warnings), report)
        return state.started(first)

    def _critique(self, request: RoundRequest, state: StudioState, on_stage: StageCallback | None = None) -> str:
        """The MLLM's analysis of how the base round misses the prompt (the question the round's seed draws,
        the same one the next Refine asks); streamed as "critique" events with the text so far."""
        base = state.base_round()
        report = on_stage or _ignore
        session = self._loaded(report)
        return session.critique(  # the Round: its reading is kept for the next Refine
            base, session.check_prompt(request.checked_prompt), request.settings.max_critique_tokens, seed=request.seed,
            on_stage=report,
        )

    def _refine(
        self,
        request: RoundRequest,
        state: StudioState,
        critique: str | None,
        on_stage: StageCallback | None = None,
        prompt: CheckedPrompt | None = None,
        edited: bool = False,
    ) -> StudioState:
        """One IMG round from the base round. `critique` (possibly edited by the user) steers it in
        dialogue mode; empty means the MLLM critiques the base itself. `prompt`: the click's prompt when
        the caller checked it already (Auto-refine checks once for all its rounds); `edited`: `critique` is
        the user's edit."""
        state.base_round()
        report = on_stage or _ignore
        session = self._loaded(report)
        prompt = session.check_prompt(prompt or request.checked_prompt)  # once per click
        return self._next_round(session, request, prompt, state, critique, report, edited)

    def _auto_refine(
        self,
        request: RoundRequest,
        state: StudioState,
        critique: str | None,
        rounds: int,
        stop_when_flat: bool = True,
        on_stage: StageCallback | None = None,
        edited: bool = False,
        later_mode: str | None = None,
    ) -> Iterator[tuple[StudioState, str | None]]:
        """Up to `rounds` IMG rounds in a row, each from the previous one, yielding (state, why it stopped
        early or None) after each. Only the first uses `critique`; later rounds are critiqued by the MLLM.
        With `stop_when_flat` it stops once a round's score is not above its base's. Each round is one
        `refine` call (one bounded GPU call on ZeroGPU); Stop is seen at every stage event and between them.
        `edited`: `critique` is the user's edit; `later_mode`: the guidance mode of the rounds after the first
        (default: the request's; the page's "auto" makes them question mode, since no edit steers them)."""
        rounds = int(LIMITS["auto_rounds"].check("auto-refine rounds", _whole(rounds)))
        state.base_round()
        report = on_stage or _ignore
        prompt = self._loaded(report).check_prompt(request.checked_prompt)  # once per click, for every round
        later = request
        if later_mode is not None:
            later = dataclasses.replace(request, settings=dataclasses.replace(request.settings, guidance_mode=later_mode))
        for step in range(rounds):
            if step == 0:
                state = self.refine(request, state, critique, report, prompt=prompt, edited=edited)
            else:
                state = self.refine(later, state, None, report, prompt=prompt)
            stalled = self.score_stalled(state) if stop_when_flat and step < rounds - 1 else None
            yield state, stalled
            if stalled:
                return

    def score_stalled(self, state: StudioState) -> str | None:
        """Why Auto-refine stops after the base round of `state`: its score, as the page shows it (rounded,
        `StudioState.shown_score`), is not above its own base's."""
        made = state.base_round()
        name = self.scorer_name
        if not name or made.base_index is None:
            return None
        before, after = state.shown_score(made.base_index, name), state.shown_score(made.index, name)
        if before is None or after is None or after > before:
            return None
        digits = state.score_digits(name)
        return (
            f"Auto-refine stopped after round {made.index}: its {name} score {after:.{digits}f} is not above round "
            f"{made.base_index}'s {before:.{digits}f}. Untick 'stop when the score stops improving' to keep going."
        )

    def _next_round(
        self,
        session: IMGSession,
        request: RoundRequest,
        prompt: CheckedPrompt,
        state: StudioState,
        critique: str | None,
        report: StageCallback,
        edited: bool = False,
    ) -> StudioState:
        """One IMG round from the base of `state`, through the session's one round path, then scored."""
        refined = session.refine(
            state.base_round(),
            prompt,
            request.seed,
            critique=critique,
            settings=request.settings,
            index=state.next_index,
            base_index=state.base,
            on_stage=report,
        )
        made = self._scored(session, _with_warnings(refined, request.warnings), report)
        return state.extended(made, edited=edited and request.settings.guidance_mode == "dialogue")

    def _loaded(self, report: StageCallback) -> IMGSession:
        """The loaded session; a load here (the first click, or a retry after a failed preparation) is
        reported as "load" events."""
        return self.host.loaded_session(report)

    def _scored(self, session: IMGSession, made: Round, report: StageCallback) -> Round:
        """`made` with its score under `self.scorer_name` (the session's own scorers, loaded once). A
        scorer that cannot run (weights missing offline, ...) leaves the round unscored with a warning:
        the round itself is never lost."""
        name = self.scorer_name
        if not name:
            return made
        report(StageEvent(Stage.SCORE, made.index, message=name))
        try:
            session.score(made, [name])
        except IMGError as error:
            logger.warning("round %d not scored with %s: %s", made.index, name, error)
            return dataclasses.replace(made, warnings=[*made.warnings, f"round {made.index} was not scored: {error}"])
        return made

    def score_is_self_judged(self) -> bool:
        """True once the page's scorer is loaded and is VQAScore judged by the guidance MLLM itself (no other
        judge was available): the cards then say so."""
        scorer = self.host.session.scorers.get(self.scorer_name) if self.scorer_name else None
        return bool(scorer is not None and scorer.self_judged)

    @staticmethod
    def select(state: StudioState, index: int) -> StudioState:
        """Make round `index` the base of the next round."""
        with user_errors():
            return state.with_base(index)

    def export(self, state: StudioState, session_id: str = "default") -> Path:
        """A zip of round_0.png, round_1.png, ... and session.json (the CLI's format), built when Download
        is clicked from the PNGs the page already wrote (`ui.image_files`), stored as they are (PNG is
        compressed already). One file per browser session (`session_id`, Gradio's session hash): each
        download replaces the previous one, and `end_session` removes it."""
        with user_errors():
            if state.is_empty:
                raise InvalidInputError("there is nothing to download yet: Generate an image first")
            first = state.rounds[0]
            record = SessionRecord(first.prompt, first.seed, self.host.preset.name, rounds=state.rounds)
            folder = _export_folder(session_id)
            for old in folder.iterdir():
                old.unlink(missing_ok=True)
            path = folder / f"img-studio-{_slug(first.prompt)}-{time.strftime('%Y%m%d-%H%M%S')}.zip"
            partial = path.with_suffix(".partial")
            with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
                for made in state.rounds:
                    archive.write(png_file(made.image), f"round_{made.index}.png")
                archive.writestr("session.json", json.dumps(record.to_dict(), indent=2) + "\n")
            partial.replace(path)  # a half-written zip is never offered
            return path

    @staticmethod
    def end_session(session_id: str) -> None:
        """Remove what `export` wrote for a browser session that has ended."""
        shutil.rmtree(_export_folder(session_id), ignore_errors=True)

    def example_rounds(self, prompt: str, seed: int) -> tuple[Image.Image, Image.Image]:
        """An example's before/after: round 0 and one Refine with the preset's defaults (the paper's
        question-mode guidance), as two GPU calls. The page caches them on first use (gr.Examples, lazily)."""
        with user_errors():
            request = RoundRequest.from_values(prompt=prompt, seed=seed)
            first = self.example_first_round(request)
            return first.image, self.example_next_round(request, first).image

    def _example_first_round(self, request: RoundRequest) -> Round:
        session = self.host.loaded_session()
        return session.generate(session.check_prompt(request.checked_prompt), request.seed, request.settings)

    def _example_next_round(self, request: RoundRequest, first: Round) -> Round:
        session = self.host.loaded_session()
        return session.refine(first, session.check_prompt(request.checked_prompt), request.seed,
                              settings=dataclasses.replace(request.settings, guidance_mode="question"), index=1)

    # --- stateless API: /generate, /critique, /refine ---------------------------------------------

    def _api_generate(self, prompt: object, seed: object) -> Image.Image:
        """Generate the original image for `prompt` and `seed` (the preset's default settings)."""
        with user_errors():
            request = RoundRequest.from_values(prompt=prompt, seed=seed)
            session = self.host.loaded_session()
            made = session.generate(request.checked_prompt, request.seed, request.settings)
            _api_warn(request.warnings, made.warnings)
            return made.image

    def _api_critique(self, image: bytes | str | Image.Image | None, prompt: object) -> str:
        """The MLLM's critique of `image` (an upload, see `_api_image`) against `prompt` (the question of seed 0)."""
        with user_errors():
            request = RoundRequest.from_values(prompt=prompt, seed=0)
            image = load_image(_api_image(image))
            text = self.host.loaded_session().critique(image, request.checked_prompt, seed=request.seed)
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
            made = session.refine(
                image, request.checked_prompt, request.seed, critique=critique, settings=request.settings
            )
            _api_warn(request.warnings, made.warnings)
            return made.image


def _api_warn(*groups: tuple[str, ...] | list[str]) -> None:
    """Non-fatal notes (a prompt cut to the length limit, ...) as Gradio warnings, each once: an API client
    sees them in the event's log messages."""
    for message in dict.fromkeys(message for group in groups for message in group):
        gr.Warning(public_text(message))


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


def _ignore(event: StageEvent) -> None:
    pass


def _whole(value: object) -> object:
    """Slider values arrive as floats (3.0); the settings check refuses 3.5 itself."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _with_warnings(made: Round, request_warnings: tuple[str, ...]) -> Round:
    """`made` carrying the request's warnings too (a prompt cut to the length limit, ...), each once."""
    warnings = list(dict.fromkeys([*request_warnings, *made.warnings]))
    return made if warnings == made.warnings else dataclasses.replace(made, warnings=warnings)


# --- models prepared in the background -----------------------------------------------------------------

PREPARATION_STEPS = len(LOAD_STEPS)  # a first load: the MLLM's preparation, pipeline, MLLM, aligner


class ModelPreparation:
    """Loads the host's models in a background thread, so the page shows at once while they prepare.
    The load counts as a running model call (ui.shutdown): a SIGTERM stops it at its next load step
    instead of leaving the interpreter to exit under a thread inside torch.

    `start()` begins (or, after a failure, retries) the preparation; the page polls `step_text`,
    `message` and `error`. A failure is kept as a message for the page; the app keeps serving, and the
    next click that needs the models loads them again."""

    def __init__(self, host: ModelHost):
        self.host = host
        self.step = 0
        self.total = PREPARATION_STEPS
        self.message = ""
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.host.is_loaded

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def step_text(self) -> str | None:
        """'k/n' while models are being prepared, else None."""
        if self.ready or not self.running:
            return None
        return f"{self.step}/{self.total}"

    def start(self) -> None:
        with self._lock:
            if self.ready or self.running:
                return
            self.step, self.total, self.message, self.error = 0, PREPARATION_STEPS, "starting", None
            self._thread = threading.Thread(target=self._prepare, name="img-studio-prepare", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the preparation to end; True when the models are ready."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.ready

    def note(self, event: StageEvent) -> None:
        """Record a `Stage.LOAD` event of `IMGSession.load` (also called for loads that a click starts)."""
        if event.step is not None and event.total:
            self.step, self.total = event.step, event.total
        self.message = event.message or self.message

    def _prepare(self) -> None:
        try:
            # a model call like any click's: SIGTERM waits for it and stops it at its next load step
            tracked(self.host.loaded_session)(self.note)
        except ServerStopping as stopped:
            logger.info("preparing the models stopped: the app is shutting down")
            self.error = str(stopped)
        except IMGError as error:
            logger.warning("preparing the models failed: %s", error)
            self.error = str(error)
        except Exception as error:  # a real failure: keep the traceback in the log
            logger.exception("preparing the models failed")
            self.error = f"{type(error).__name__}: {error}"


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
