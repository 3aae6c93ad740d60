"""An IMG session: one loaded stack (diffusion backend + MLLM critic + Implicit Aligner) and the rounds
it makes. This is the one round path: the CLI, the app, `evaluate` and the trainer call these methods.

A session is built from the one frozen `ModelOptions` the flags produce (`IMGSession(options)`); its parts
load and unload through its own methods (`load(parts)`, `unload(parts)`), never by setting attributes.

One round of IMG (REFERENCE §1), from a base image and its prompt:
    1. critique       the MLLM's misalignment analysis as text (shown, editable, recorded)
    2. guidance       MLLM last-layer hidden states over the conversation      (1, Sg, Dg)
       In question mode 1 and 2 come from ONE prefill of the MLLM; `critique=False` skips the text.
       `critique(round)` keeps that reading with the round: Refine with the unedited critique reuses it.
       Guidance mode "auto" (default): dialogue over the critique when the user edited it, else question.
    3. image features IP-Adapter tokens of the base image (kept with its Round) (1, Si, D)
    4. align          the Implicit Aligner applied `aligner_passes` times      (1, Si, D)
    5. regenerate     same prompt and seed, aligned tokens at `ip_scale`; the prompt's text embeddings
                      are encoded once per prompt and reused
Round 0 is the base model's own image (or the user's). Same inputs and seed give the same images.

Progress goes to an optional `on_stage` callback as `StageEvent`s of one closed set of `Stage`s (stage,
step i/n - loading too: part k of n -, critique so far). The prompt is checked once per click
(`check_prompt` -> `CheckedPrompt`, which every round method takes as it is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from img_core.aligner import ImplicitAligner
from img_core.backends import backend_class
from img_core.backends.base import DiffusionCall
from img_core.errors import (
    IncompatibleAlignerError,
    InvalidInputError,
    OutOfMemoryError,
)
from img_core.evaluation.scorers import check_scorer_names, load_scorer
from img_core.hub import download_file
from img_core.images import load_image
from img_core.mllm.critic import MLLMCritic, MLLMReading
from img_core.mllm.loading import load_mllm, resolve_mllm
from img_core.mllm.quantization import PrecisionChoice, mllm_precision
from img_core.presets import Preset, default_preset_name, get_preset, needs_offload
from img_core.record import (
    GUIDED_BY_EDIT,
    GUIDED_BY_MLLM,
    KeptReading,
    Round,
    SessionRecord,
)
from img_core.settings import (
    CheckedPrompt,
    ModelOptions,
    RoundSettings,
    check_prompt,
    check_rounds,
    check_seed,
)
from img_core.tiny.models import ensure_tiny_models
from img_core.weights.prepare import format_progress

logger = logging.getLogger(__name__)


class Stage(enum.StrEnum):
    """Every state a job of the session (and of the app around it) reports: one closed set, defined here
    and imported by the CLI and the UI."""

    QUEUED = "queued"  # waiting for the models or for another job (the app's queue)
    LOAD = "load"  # loading the models: step k of n parts
    GENERATE = "generate"  # round 0: diffusion steps
    CRITIQUE = "critique"  # the MLLM writes its critique (text streams)
    GUIDANCE = "guidance"  # the MLLM's guidance features, without writing text
    IMAGE_FEATURES = "image_features"  # IP-Adapter tokens of the base image
    ALIGN = "align"  # the Implicit Aligner
    REGENERATE = "regenerate"  # the refined image: diffusion steps
    SCORE = "score"  # an alignment score of the new round
    STOPPING = "stopping"  # Stop was asked: the job ends at its next stage; finished rounds are kept
    DONE = "done"


@dataclass(frozen=True)
class StageEvent:
    """Where a job is: `stage` is a `Stage`; `step`/`total` count diffusion steps (LOAD: the part being
    loaded, k of n); `text` is the critique streamed so far; `message` says what is being loaded or scored."""

    stage: Stage
    round_index: int = 0
    step: int | None = None
    total: int | None = None
    text: str | None = None
    message: str | None = None


StageCallback = Callable[[StageEvent], None]


def _ignore(event: StageEvent) -> None:
    pass


def _logging(report: StageCallback | None) -> StageCallback:
    """`report`, with every loading event also logged (the CLI and servers see loading in their logs)."""

    def log_and_report(event: StageEvent) -> None:
        logger.info("loading %s/%s: %s", event.step, event.total, event.message)
        if report is not None:
            report(event)

    return log_and_report


def _checked_parts(parts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = [part for part in parts if part not in SESSION_PARTS]
    if unknown or isinstance(parts, str):
        raise InvalidInputError(f"session parts must be a list of {SESSION_PARTS}, got {parts!r}")
    return tuple(part for part in SESSION_PARTS if part in parts)


SESSION_PARTS = ("diffusion", "mllm", "aligner")  # what `load` and `unload` take, in loading order
# The steps of loading everything (Stage.LOAD events count k of n over these): the MLLM's preparation
# (tiny build, or download and conversion on first use), then each part.
LOAD_STEPS = ("prepare", *SESSION_PARTS)


class IMGSession:
    """Owns the loaded models of one `ModelOptions` (the frozen options the flags produce). Loads lazily,
    each part once; every public call is serialised.

    Parts (`SESSION_PARTS`): "diffusion" (the backend), "mllm" (the critic), "aligner". `load(parts)` loads
    the missing ones (the aligner needs the other two: it is checked against them), `unload(parts)` frees
    them (a later round loads them again). Options never change after construction: `with_options` gives a
    new, unloaded session."""

    def __init__(
        self,
        options: ModelOptions | None = None,
        *,
        tiny_root: str | Path | None = None,
        show_progress_bars: bool = True,
    ):
        self.options = options or ModelOptions()
        self.base_preset = get_preset(self.options.preset or default_preset_name())
        self.device = torch.device(self.options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tiny_root = Path(tiny_root) if tiny_root else None  # None: img_core.paths.tiny_models_root()
        self.show_progress_bars = show_progress_bars
        self.offload = self.options.offload  # what is in effect once the pipeline is loaded
        self.preset = self.base_preset  # resolved to absolute tiny paths on load
        self.backend = None
        self.critic: MLLMCritic | None = None
        self.mllm_precision: PrecisionChoice | None = None  # chosen at load (img_core.mllm.quantization)
        self.aligner: ImplicitAligner | None = None
        self.load_seconds: dict[str, float] = {}
        self.scorers: dict = {}  # name -> loaded scorer (img_core.evaluation.scorers), on first use
        self._lock = threading.RLock()

    @classmethod
    def from_preset(
        cls, name: str, *, tiny_root: str | Path | None = None, show_progress_bars: bool = True, **options
    ) -> IMGSession:
        """`IMGSession(ModelOptions(preset=name, **options))`: a session for a preset name (`sdxl`,
        `sdxl-dpo`, `flux-dev`, `tiny-sdxl`, `tiny-flux`). Loads nothing."""
        values = {key: str(value) if key in ("device", "aligner") and value is not None else value
                  for key, value in options.items()}
        return cls(ModelOptions(preset=name, **values), tiny_root=tiny_root, show_progress_bars=show_progress_bars)

    @classmethod
    def from_parts(cls, preset: Preset, backend, critic: MLLMCritic, aligner: ImplicitAligner,
                   device: str | torch.device) -> IMGSession:
        """A session around models built elsewhere (the GPU benchmark's random-weight stacks of a `preset`
        changed in size or steps); the aligner is checked against the other two. Nothing loads."""
        session = cls(ModelOptions(preset=preset.name, device=str(device)), show_progress_bars=False)
        session.base_preset = session.preset = preset
        session.backend, session.critic = backend, critic
        session._check_compatible(aligner)
        session.aligner = aligner
        return session

    def with_options(self, **changes) -> IMGSession:
        """A new, unloaded session whose options are these with `changes` (field names of `ModelOptions`);
        the tiny models root and progress-bar setting are kept."""
        return IMGSession(dataclasses.replace(self.options, **changes), tiny_root=self.tiny_root,
                          show_progress_bars=self.show_progress_bars)

    # What the options ask for, by the names the app and the CLI show.
    @property
    def mllm_name(self) -> str:
        return self.options.mllm or self.base_preset.mllm

    @property
    def quantization(self) -> str | None:
        """The MLLM quantization asked for (None: the device's default)."""
        return self.options.quantization

    @property
    def questions_spec(self) -> str:
        return self.options.questions or self.base_preset.questions

    @property
    def loaded_parts(self) -> tuple[str, ...]:
        held = {"diffusion": self.backend, "mllm": self.critic, "aligner": self.aligner}
        return tuple(part for part in SESSION_PARTS if held[part] is not None)

    @property
    def is_loaded(self) -> bool:
        return self.loaded_parts == SESSION_PARTS

    @property
    def dtype(self) -> torch.dtype:
        if self.device.type != "cuda":
            return torch.float32
        return getattr(torch, self.base_preset.dtype)

    # ------------------------------------------------------------------ loading

    def load(
        self, parts: tuple[str, ...] | list[str] = SESSION_PARTS, on_stage: StageCallback | None = None
    ) -> IMGSession:
        """Load the missing `parts` (each once), then check that the aligner fits the other two.

        Reports a "load" `StageEvent` with step k of n as each part starts (n counts the parts this call
        loads, plus the MLLM's preparation: tiny build, or download and conversion on first use), and a
        last one (step n of n) when all are loaded."""
        wanted = _checked_parts(parts)
        if "aligner" in wanted:  # checked against the backend's features and the MLLM's width
            wanted = SESSION_PARTS
        with self._lock:
            missing = [part for part in wanted if part not in self.loaded_parts]
            if not missing:
                return self
            steps = [step for step in LOAD_STEPS if step in missing or (step == "prepare" and "mllm" in missing)]
            report = _logging(on_stage)

            def begin(part: str, message: str) -> None:
                report(StageEvent(Stage.LOAD, step=steps.index(part) + 1, total=len(steps), message=message))

            if self.base_preset.is_tiny and self.preset is self.base_preset:
                self.tiny_root = ensure_tiny_models(self.tiny_root)
                self.preset = self.base_preset.resolved(self.tiny_root)
            if "prepare" in steps:  # first: a real MLLM may need downloading and converting (once, cached)
                begin("prepare", f"getting the MLLM {self.mllm_name} ready")
                with self._stage("prepare_mllm", self.load_seconds):
                    spec = resolve_mllm(
                        self.mllm_name, self.tiny_root,
                        on_progress=lambda *event: begin("prepare", format_progress(*event)),
                    )
                # measured before anything of this session is on the GPU (the preset's estimates count the rest)
                self.mllm_precision = mllm_precision(self.mllm_name, self.device, self.base_preset, self.quantization)
            if "diffusion" in missing:
                self._load_backend(lambda message: begin("diffusion", message))
            if "mllm" in missing:
                begin("mllm", f"loading the MLLM {spec.name} in {self.mllm_precision.reason}")
                with self._stage("load_mllm", self.load_seconds):
                    self.critic = load_mllm(spec, device=self.device, quantization=self.mllm_precision.quantization,
                                            questions=self.questions_spec)
            if "aligner" in missing:
                begin("aligner", "loading the Implicit Aligner")
                with self._stage("load_aligner", self.load_seconds):
                    loaded = self._load_aligner().to(self.device, dtype=torch.float32).eval()
                self._check_compatible(loaded)
                self.aligner = loaded
            report(StageEvent(Stage.LOAD, step=len(steps), total=len(steps), message="models loaded"))
            return self

    def unload(self, parts: tuple[str, ...] | list[str] = SESSION_PARTS) -> None:
        """Free `parts` (and the scorers that use the MLLM with it) so that other models fit in their
        memory; a later round loads them again."""
        with self._lock:
            for part in _checked_parts(parts):
                if part == "diffusion":
                    self.backend = None
                elif part == "mllm":
                    self.critic = None
                    self.scorers = {name: scorer for name, scorer in self.scorers.items()
                                    if getattr(scorer, "owns_critic", True)}
                else:
                    self.aligner = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _load_backend(self, say: Callable[[str], None]) -> None:
        preset = self.preset
        self.offload = self.options.offload if self.options.offload is not None else self._auto_offload(say)
        quantization = self.options.diffusion_quantization or (
            preset.diffusion_quantization if self.device.type == "cuda" else "none"
        )
        say(f"loading the {preset.family} pipeline {self.base_preset.pipeline_id} (quantization: {quantization})")
        with self._stage("load_diffusion", self.load_seconds):
            self.backend = backend_class(preset.family).load(
                preset, self.device, self.dtype, offload=self.offload, quantization=quantization
            )
            self.backend.pipeline.set_progress_bar_config(disable=not self.show_progress_bars)

    def _auto_offload(self, say: Callable[[str], None]) -> bool:
        """CPU-offload the pipeline when the GPU is smaller than the preset's estimate."""
        if self.device.type != "cuda":
            return False
        total_gib = torch.cuda.get_device_properties(self.device).total_memory / 1024**3
        if needs_offload(self.base_preset, total_gib):
            say(f"GPU has {total_gib:.0f} GiB, {self.base_preset.name} needs about "
                f"{self.base_preset.resident_gib:.0f} GiB resident: offloading the pipeline to the CPU between uses")
            return True
        return False

    def _load_aligner(self) -> ImplicitAligner:
        source = self.options.aligner
        if source is not None:
            check_aligner_source(source)
            path = Path(source)
            if path.is_file():
                return ImplicitAligner.from_official_checkpoint(path)
            return ImplicitAligner.from_pretrained(source)
        spec = self.preset.aligner
        if spec.filename:
            path = download_file(spec.repo, spec.filename)
            return ImplicitAligner.from_official_checkpoint(path, mllm=spec.mllm, chat_template=spec.chat_template)
        return ImplicitAligner.from_pretrained(spec.repo)

    def _check_compatible(self, aligner: ImplicitAligner) -> None:
        config = aligner.config
        backend = self.backend
        if config.image_feature_kind != backend.feature_kind or config.image_dim != backend.feature_dim:
            raise IncompatibleAlignerError(
                f"the aligner was trained on {config.image_feature_kind} image features (width {config.image_dim}) "
                f"but the {self.preset.name} preset uses {backend.feature_kind} features (width "
                f"{backend.feature_dim}): use the aligner made for {backend.family} (e.g. aligner_"
                f"{backend.family}.pth) or another preset"
            )
        if config.guidance_dim != self.critic.hidden_size:
            raise IncompatibleAlignerError(
                f"the aligner expects guidance of width {config.guidance_dim} (MLLM {config.mllm or 'unknown'}) "
                f"but the MLLM {self.critic.spec.name} gives width {self.critic.hidden_size}: use the MLLM the "
                "aligner was trained with, or an aligner trained for this MLLM"
            )
        if config.mllm and config.mllm != self.critic.spec.name:
            logger.warning(
                "aligner was trained with guidance from %s, now guided by %s", config.mllm, self.critic.spec.name
            )

    # ------------------------------------------------------------------ rounds

    def check_prompt(self, prompt: str | CheckedPrompt) -> CheckedPrompt:
        """The prompt checked for this session, once: its characters (`settings.check_prompt`) and the
        token limits of this preset's text encoders (one tokenizer pass; loads the pipeline if needed).
        Pass the result to the round methods, which then check nothing again."""
        checked = check_prompt(prompt)
        if checked.encoders == self.base_preset.name:
            return checked
        self.load(["diffusion"])
        with self._lock:
            return self.backend.check_prompt(checked)

    def generate(
        self,
        prompt: str | CheckedPrompt,
        seed: int,
        settings: RoundSettings | None = None,
        on_stage: StageCallback | None = None,
    ) -> Round:
        """Round 0: the base model's image for `prompt` and `seed`."""
        values = (settings or RoundSettings()).resolve(self.base_preset)
        seed = check_seed(seed)
        prompt_check = check_prompt(prompt)  # cheap checks first: bad input never waits for a model load
        report = on_stage or _ignore
        self._load_reporting(report)
        with self._lock:
            prompt_check = self.check_prompt(prompt_check)
            call = self._call(prompt_check.prompt, seed, values)
            seconds: dict[str, float] = {}
            with self._stage("generate", seconds):
                report(StageEvent(Stage.GENERATE, 0, 0, values.steps))
                image = self.backend.generate(call, self._step_reporter(report, Stage.GENERATE, 0))
        report(StageEvent(Stage.DONE, 0))
        return Round(0, image, prompt_check.prompt, seed, "generated", settings=values.to_dict(), seconds=seconds,
                     warnings=list(prompt_check.warnings))

    def start_from_image(self, image, prompt: str | CheckedPrompt, seed: int = 0) -> Round:
        """Round 0 from the user's own image (any size/mode; converted to RGB, huge images resized)."""
        image = load_image(image)
        seed = check_seed(seed)
        prompt_check = check_prompt(prompt)
        self.load()
        prompt_check = self.check_prompt(prompt_check)
        return Round(0, image, prompt_check.prompt, seed, "uploaded", warnings=list(prompt_check.warnings))

    def critique(
        self,
        image: Round | Image.Image | str | Path,
        prompt: str | CheckedPrompt,
        max_new_tokens: int | None = None,
        seed: int = 0,
        on_stage: StageCallback | None = None,
    ) -> str:
        """The MLLM's analysis of how `image` misses `prompt`, asked the question the seed draws (the same
        question a round with this seed asks).

        Question-mode guidance comes from the same prefill; for a `Round` the whole reading is kept with it
        (`Round.reading`), so a Refine from that round with the unedited critique does not run the MLLM again."""
        settings = RoundSettings() if max_new_tokens is None else RoundSettings(max_critique_tokens=max_new_tokens)
        settings.check()
        base = image if isinstance(image, Round) else None
        image = load_image(base.image if base is not None else image)
        seed = check_seed(seed)
        prompt_check = check_prompt(prompt)
        report = on_stage or _ignore
        self._load_reporting(report)
        with self._lock, self._stage("critique", {}):
            prompt_check = self.check_prompt(prompt_check)
            report(StageEvent(Stage.CRITIQUE))
            reading = self.critic.read(
                image, prompt_check.prompt, seed=seed, mode="question", write_critique=True,
                max_new_tokens=settings.max_critique_tokens,
                on_text=lambda text: report(StageEvent(Stage.CRITIQUE, text=text)),
            )
            if base is not None:
                base.reading = KeptReading(
                    reading.question, reading.critique, reading.guidance,
                    self._reading_conditions(prompt_check.prompt, seed, settings.max_critique_tokens),
                )
        return reading.critique

    def refine(
        self,
        image: Round | Image.Image | str | Path,
        prompt: str | CheckedPrompt,
        seed: int,
        critique: str | None = None,
        settings: RoundSettings | None = None,
        index: int = 1,
        base_index: int | None = None,
        on_stage: StageCallback | None = None,
    ) -> Round:
        """One IMG round from `image` (a `Round` keeps its IP features and its Critique reading for the next time).

        The guidance mode (`settings.guidance_mode`): "auto" (default) is dialogue when `critique` is an edit
        - any text other than what the MLLM wrote for this base (`Round.reading`) - so the edit steers the
        round, else question mode, the release's guidance. "question" and "dialogue" force either.
        Without a critique the MLLM writes one (recorded; in dialogue mode it steers the guidance; in
        question mode it comes from the same prefill as the guidance, or is skipped with
        `settings.critique=False`). With one, dialogue mode is guided by it as given; question mode records
        it. Question mode from a `Round` that Critique read under the same prompt, seed and MLLM reuses that
        reading's guidance: the MLLM does not run again. The Round records the mode used and
        `guidance_source` (the MLLM's own reading or the edited critique)."""
        values = (settings or RoundSettings()).resolve(self.base_preset)
        seed = check_seed(seed)
        base = image if isinstance(image, Round) else None
        image = load_image(base.image if base is not None else image)
        critique = critique.strip() if isinstance(critique, str) and critique.strip() else None
        prompt_check = check_prompt(prompt)
        report = on_stage or _ignore
        self._load_reporting(report, index)
        with self._lock:
            prompt_check = self.check_prompt(prompt_check)
            seconds: dict[str, float] = {}
            kept = base.reading if base is not None else None
            conditions = self._reading_conditions(prompt_check.prompt, seed, values.max_critique_tokens)
            # An edit: a critique other than the one the MLLM wrote for this base (typed, or changed).
            edited = critique is not None and (kept is None or critique != kept.critique)
            mode = values.guidance_mode
            if mode == "auto":
                mode = "dialogue" if edited else "question"
            if mode == "question" and kept is not None and kept.conditions == conditions:
                with self._stage("guidance", seconds):  # Critique read this round already: nothing to run
                    report(StageEvent(Stage.GUIDANCE, index, message="kept from the critique"))
                    reading = MLLMReading(kept.question, kept.critique, kept.guidance)
            else:
                writes = critique is None and (mode == "dialogue" or values.critique)
                stage = Stage.CRITIQUE if writes else Stage.GUIDANCE
                with self._stage(stage, seconds):
                    report(StageEvent(stage, index))
                    reading = self.critic.read(
                        image,
                        prompt_check.prompt,
                        seed=seed,
                        mode=mode,
                        critique=critique,
                        write_critique=writes,
                        max_new_tokens=values.max_critique_tokens,
                        on_text=lambda text: report(StageEvent(Stage.CRITIQUE, index, text=text)),
                    )
            with self._stage("image_features", seconds):
                report(StageEvent(Stage.IMAGE_FEATURES, index))
                image_features = base.image_features if base is not None else None
                if image_features is None:
                    image_features = self.backend.image_features(image)
                    if base is not None:
                        base.image_features = image_features
            with self._stage("align", seconds):
                report(StageEvent(Stage.ALIGN, index))
                with torch.no_grad():
                    aligned_features = self.aligner.align(
                        image_features.to(self.device), reading.guidance.to(self.device), passes=values.aligner_passes
                    ).float().cpu()
            with self._stage("regenerate", seconds):
                report(StageEvent(Stage.REGENERATE, index, 0, values.steps))
                call = self._call(prompt_check.prompt, seed, values)
                new_image = self.backend.regenerate(
                    call, aligned_features, self._step_reporter(report, Stage.REGENERATE, index)
                )
        report(StageEvent(Stage.DONE, index))
        return Round(
            index,
            new_image,
            prompt_check.prompt,
            seed,
            "refined",
            critique=critique if critique is not None else reading.critique,
            guidance_mode=mode,
            guidance_source=GUIDED_BY_EDIT if mode == "dialogue" and edited else GUIDED_BY_MLLM,
            question=reading.question,
            question_source=self.critic.questions.name,
            base_index=base_index if base_index is not None else (base.index if base is not None else index - 1),
            settings=values.to_dict(),
            seconds=seconds,
            warnings=list(prompt_check.warnings),
        )

    def _reading_conditions(self, prompt: str, seed: int, max_new_tokens: int) -> tuple:
        """What an MLLM reading of an image depends on besides the image: a kept reading is reused only
        under equal conditions."""
        critic = self.critic
        return (critic.spec.name, critic.spec.model_id, critic.quantization, critic.questions.name,
                prompt, seed, max_new_tokens)

    def score(self, made: Round, scorers: list[str] | tuple[str, ...]) -> dict[str, float]:
        """Alignment scores of a round against its prompt (img_core.evaluation.scorers: `vqascore` asks this session's
        MLLM; others load their own weights once). They are recorded in `made.scores` and returned."""

        names = check_scorer_names(list(scorers))
        self.load()
        with self._lock:
            for name in names:
                if name not in self.scorers:
                    tiny_root = self.tiny_root if self.base_preset.is_tiny else None
                    self.scorers[name] = load_scorer(name, device=self.device, tiny_root=tiny_root, critic=self.critic)
                made.scores[name] = self.scorers[name].score([made.image], [made.prompt])[0]
        return {name: made.scores[name] for name in names}

    def run(
        self,
        prompt: str | CheckedPrompt,
        seed: int,
        rounds: int = 1,
        settings: RoundSettings | None = None,
        image=None,
        on_stage: StageCallback | None = None,
        scorers: list[str] | tuple[str, ...] = (),
    ) -> SessionRecord:
        """Round 0 (generated, or `image`) then `rounds` IMG rounds, each from the previous round; with
        `scorers`, every round's scores are recorded."""
        rounds = check_rounds(rounds)
        if scorers:
            check_scorer_names(list(scorers))
        settings = settings or RoundSettings()
        settings.resolve(self.base_preset)
        check_seed(seed)
        prompt = check_prompt(prompt)  # the characters, before any model loads
        if image is not None:
            image = load_image(image)
        self._load_reporting(on_stage or _ignore)
        prompt = self.check_prompt(prompt)  # the token limits: once for every round
        first = (
            self.start_from_image(image, prompt, seed)
            if image is not None
            else self.generate(prompt, seed, settings, on_stage=on_stage)
        )
        record = SessionRecord(first.prompt, first.seed, self.base_preset.name, [first])
        if scorers:
            self.score(first, scorers)
        for index in range(1, rounds + 1):
            made = self.refine(record.rounds[-1], prompt, first.seed, None, settings, index=index, on_stage=on_stage)
            if scorers:
                self.score(made, scorers)
            record.rounds.append(made)
        return record

    # ------------------------------------------------------------------ helpers

    def _call(self, prompt: str, seed: int, values) -> DiffusionCall:
        return DiffusionCall(
            prompt=prompt,
            seed=seed,
            steps=values.steps,
            guidance_scale=values.guidance_scale,
            width=values.width,
            height=values.height,
            ip_scale=values.ip_scale,
        )

    def _load_reporting(self, report: StageCallback, round_index: int = 0) -> None:
        """Load the models (once), passing the "load" stage events on with this round's index."""
        if not self.is_loaded:
            self.load(on_stage=lambda event: report(dataclasses.replace(event, round_index=round_index)))

    @staticmethod
    def _step_reporter(report: StageCallback, stage: Stage, round_index: int):
        if report is _ignore:
            return None
        return lambda step, total: report(StageEvent(stage, round_index, step, total))

    @contextlib.contextmanager
    def _stage(self, name: str, seconds: dict[str, float]) -> Iterator[None]:
        """Time a stage and turn CUDA out-of-memory into advice the user can act on."""
        start = time.perf_counter()
        try:
            yield
        except torch.cuda.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"the GPU ran out of memory during '{name}' ({self.base_preset.name}). Lower what costs memory: "
                "quantize the MLLM (--quantization bnb-nf4), enable CPU offload (--offload), or use fewer "
                "steps / a smaller preset; close other programs using the GPU."
            ) from error
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


# Re-exported for callers that import them from here.
__all__ = [
    "LOAD_STEPS", "SESSION_PARTS", "IMGSession", "Round", "RoundSettings", "SessionRecord", "Stage", "StageEvent",
    "StageCallback",
]


ALIGNER_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def check_aligner_source(source: str | Path) -> None:
    """Refuse an `--aligner` that is neither an existing file or folder nor a hub repo id ("owner/name"),
    before any model loads (a missing path would otherwise reach the hub as a malformed repo id)."""
    text = str(source)
    if Path(text).exists():
        return
    repo_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.endswith(ALIGNER_FILE_SUFFIXES)
    if not repo_id:
        raise InvalidInputError(
            f"--aligner {text}: the path does not exist; pass a folder written by save_pretrained, an official "
            ".pth file or a Hugging Face repo id (owner/name)"
        )
