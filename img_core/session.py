"""An IMG session: one loaded stack (diffusion backend + MLLM critic + Implicit Aligner) and the rounds
it makes. This is the one round path: the CLI, the app, `evaluate` and the trainer call these methods.

One round of IMG (REFERENCE §1), from a base image and its prompt:
    1. critique       the MLLM's misalignment analysis as text (shown, editable, recorded)
    2. guidance       MLLM last-layer hidden states over the conversation      (1, Sg, Dg)
       In question mode 1 and 2 come from ONE prefill of the MLLM; `critique=False` skips the text.
    3. image features IP-Adapter tokens of the base image (kept with its Round) (1, Si, D)
    4. align          the Implicit Aligner applied `aligner_passes` times      (1, Si, D)
    5. regenerate     same prompt and seed, aligned tokens at `ip_scale`; the prompt's text embeddings
                      are encoded once per prompt and reused
Round 0 is the base model's own image (or the user's). Same inputs and seed give the same images.

Progress goes to an optional `on_stage` callback as `StageEvent`s (stage, step i/n, critique so far).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from img_core.aligner import ImplicitAligner
from img_core.backends.base import DiffusionCall
from img_core.errors import (
    IncompatibleAlignerError,
    InvalidInputError,
    OutOfMemoryError,
)
from img_core.images import load_image
from img_core.presets import Preset, get_preset
from img_core.record import Round, SessionRecord
from img_core.settings import RoundSettings, check_prompt, check_rounds, check_seed

if TYPE_CHECKING:
    from img_core.mllm.quantization import PrecisionChoice

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str], None]  # loading messages


@dataclass(frozen=True)
class StageEvent:
    """Where a round is: `stage` is one of load, generate, critique, guidance, image_features, align,
    regenerate, done; `step`/`total` count diffusion steps; `text` is the critique streamed so far."""

    stage: str
    round_index: int = 0
    step: int | None = None
    total: int | None = None
    text: str | None = None
    message: str | None = None


StageCallback = Callable[[StageEvent], None]


def _ignore(event: StageEvent) -> None:
    pass


class IMGSession:
    """Owns the loaded models of one preset. Loads lazily, once; every public call is serialised."""

    def __init__(
        self,
        preset: Preset,
        device: str | torch.device | None = None,
        quantization: str | None = None,
        mllm: str | None = None,
        aligner: str | Path | None = None,
        offload: bool | None = None,
        diffusion_quantization: str | None = None,
        tiny_root: str | Path | None = None,
        show_progress_bars: bool = True,
        questions: str | None = None,
    ):
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base_preset = preset
        self.quantization = quantization
        self.mllm_precision: PrecisionChoice | None = None  # chosen at load (img_core.mllm.quantization)
        self.mllm_name = mllm or preset.mllm
        self.aligner_source = aligner
        self.offload_requested = offload  # what the user asked for (None: automatic)
        self.offload = offload  # what is in effect once loaded
        self.diffusion_quantization = diffusion_quantization
        self.tiny_root = Path(tiny_root) if tiny_root else None
        self.show_progress_bars = show_progress_bars
        self.questions_requested = questions  # None: the preset's question source
        self.questions_spec = questions or preset.questions
        self.preset = preset  # resolved to absolute tiny paths on load
        self.backend = None
        self.critic = None
        self.aligner: ImplicitAligner | None = None
        self.load_seconds: dict[str, float] = {}
        self.scorers: dict = {}  # name -> loaded scorer (img_core.evaluation.scorers), on first use
        self._lock = threading.RLock()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> IMGSession:
        """A session for a preset name (`sdxl`, `sdxl-dpo`, `flux-dev`, `tiny-sdxl`, `tiny-flux`). Loads nothing."""
        return cls(get_preset(name), **kwargs)

    @property
    def is_loaded(self) -> bool:
        return self.backend is not None and self.critic is not None and self.aligner is not None

    @property
    def dtype(self) -> torch.dtype:
        if self.device.type != "cuda":
            return torch.float32
        return getattr(torch, self.base_preset.dtype)

    # ------------------------------------------------------------------ loading

    def load(self, progress: ProgressCallback | None = None, aligner: bool = True) -> IMGSession:
        """Load the diffusion backend, the MLLM critic and the aligner (each once), then check they fit.

        `aligner=False` loads only the backend and the critic (feature extraction needs no aligner)."""
        with self._lock:
            if self.is_loaded or (not aligner and self.backend is not None and self.critic is not None):
                return self
            say = progress or (lambda message: logger.info(message))
            if self.base_preset.is_tiny and self.preset is self.base_preset:
                from img_core.tiny.models import ensure_tiny_models

                say("building/loading the tiny random-weight models")
                self.tiny_root = ensure_tiny_models(self.tiny_root)
                self.preset = self.base_preset.resolved(self.tiny_root)
            preset = self.preset

            from img_core.backends import backend_class
            from img_core.mllm import MLLMCritic
            from img_core.mllm.quantization import mllm_precision
            from img_core.questions import load_question_source

            if self.critic is None:  # first: a real MLLM may need downloading and converting (once, cached)
                from img_core.weights.prepare import (
                    format_progress,
                    resolve_prepared_spec,
                )

                with self._stage("prepare_mllm", self.load_seconds):
                    spec = resolve_prepared_spec(
                        self.mllm_name, self.tiny_root, progress=lambda *event: say(format_progress(*event))
                    )
                # measured before anything of this session is on the GPU (the preset's estimates count the rest)
                self.mllm_precision = mllm_precision(self.mllm_name, self.device, self.base_preset, self.quantization)
            if self.backend is None:
                self.offload = self.offload_requested if self.offload_requested is not None else self._auto_offload(say)
                with self._stage("load_diffusion", self.load_seconds):
                    quantization = self.diffusion_quantization or (
                        preset.diffusion_quantization if self.device.type == "cuda" else "none"
                    )
                    say(f"loading the {preset.family} pipeline {preset.pipeline_id} (quantization: {quantization})")
                    self.backend = backend_class(preset.family).load(
                        preset, self.device, self.dtype, offload=self.offload, quantization=quantization
                    )
                    self.backend.pipeline.set_progress_bar_config(disable=not self.show_progress_bars)
            if self.critic is None:
                with self._stage("load_mllm", self.load_seconds):
                    quantization = self.mllm_precision.quantization
                    say(f"loading the MLLM {spec.model_id} in {self.mllm_precision.reason}")
                    critic = MLLMCritic.load(spec, device=self.device, quantization=quantization)
                    critic.questions = load_question_source(self.questions_spec)
                    self.critic = critic
            if aligner and self.aligner is None:
                with self._stage("load_aligner", self.load_seconds):
                    say("loading the Implicit Aligner")
                    loaded = self._load_aligner().to(self.device, dtype=torch.float32).eval()
                self._check_compatible(loaded)
                self.aligner = loaded
            say("models loaded")
            return self

    def _auto_offload(self, say: ProgressCallback) -> bool:
        """CPU-offload the pipeline when the GPU is smaller than the preset's estimate."""
        from img_core.presets import needs_offload

        if self.device.type != "cuda":
            return False
        total_gib = torch.cuda.get_device_properties(self.device).total_memory / 1024**3
        if needs_offload(self.base_preset, total_gib):
            say(f"GPU has {total_gib:.0f} GiB, {self.base_preset.name} needs about "
                f"{self.base_preset.resident_gib:.0f} GiB resident: offloading the pipeline to the CPU between uses")
            return True
        return False

    def _load_aligner(self) -> ImplicitAligner:
        from img_core.hub import download_file

        source = self.aligner_source
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

    def generate(
        self, prompt: str, seed: int, settings: RoundSettings | None = None, on_stage: StageCallback | None = None
    ) -> Round:
        """Round 0: the base model's image for `prompt` and `seed`."""
        values = (settings or RoundSettings()).resolve(self.base_preset)
        seed = check_seed(seed)
        prompt_check = check_prompt(prompt)  # cheap checks first: bad input never waits for a model load
        report = on_stage or _ignore
        self._load_reporting(report)
        with self._lock:
            prompt_check = self.backend.check_prompt(prompt_check.prompt)
            call = self._call(prompt_check.prompt, seed, values)
            seconds: dict[str, float] = {}
            with self._stage("generate", seconds):
                report(StageEvent("generate", 0, 0, values.steps))
                image = self.backend.generate(call, self._step_reporter(report, "generate", 0))
        report(StageEvent("done", 0))
        return Round(0, image, prompt_check.prompt, seed, "generated", settings=values.to_dict(), seconds=seconds,
                     warnings=list(prompt_check.warnings))

    def start_from_image(self, image, prompt: str, seed: int = 0) -> Round:
        """Round 0 from the user's own image (any size/mode; converted to RGB, huge images resized)."""
        image = load_image(image)
        seed = check_seed(seed)
        prompt_check = check_prompt(prompt)
        self.load()
        prompt_check = self.backend.check_prompt(prompt_check.prompt)
        return Round(0, image, prompt_check.prompt, seed, "uploaded", warnings=list(prompt_check.warnings))

    def critique(
        self,
        image,
        prompt: str,
        max_new_tokens: int | None = None,
        seed: int = 0,
        on_stage: StageCallback | None = None,
    ) -> str:
        """The MLLM's analysis of how `image` misses `prompt`, asked the question the seed draws (the same
        question a round with this seed asks)."""
        settings = RoundSettings() if max_new_tokens is None else RoundSettings(max_critique_tokens=max_new_tokens)
        settings.check()
        image = load_image(image)
        seed = check_seed(seed)
        prompt_check = check_prompt(prompt)
        report = on_stage or _ignore
        self._load_reporting(report)
        with self._lock, self._stage("critique", {}):
            prompt_check = self.backend.check_prompt(prompt_check.prompt)
            report(StageEvent("critique"))
            return self.critic.critique(
                image, prompt_check.prompt, max_new_tokens=settings.max_critique_tokens, seed=seed,
                on_text=lambda text: report(StageEvent("critique", text=text)),
            )

    def refine(
        self,
        image: Round | Image.Image | str | Path,
        prompt: str,
        seed: int,
        critique: str | None = None,
        settings: RoundSettings | None = None,
        index: int = 1,
        base_index: int | None = None,
        on_stage: StageCallback | None = None,
    ) -> Round:
        """One IMG round from `image` (a `Round` keeps its IP features for the next time).

        Without a critique the MLLM writes one (recorded; in dialogue mode it steers the guidance; in
        question mode it comes from the same prefill as the guidance, or is skipped with
        `settings.critique=False`). With one, dialogue mode is guided by it as given; question mode records it."""
        values = (settings or RoundSettings()).resolve(self.base_preset)
        seed = check_seed(seed)
        base = image if isinstance(image, Round) else None
        image = load_image(base.image if base is not None else image)
        critique = critique.strip() if isinstance(critique, str) and critique.strip() else None
        prompt_check = check_prompt(prompt)
        report = on_stage or _ignore
        self._load_reporting(report, index)
        with self._lock:
            prompt_check = self.backend.check_prompt(prompt_check.prompt)
            seconds: dict[str, float] = {}
            guided_by_text = values.guidance_mode == "dialogue"
            writes = critique is None and (guided_by_text or values.critique)
            stage = "critique" if writes else "guidance"
            with self._stage(stage, seconds):
                report(StageEvent(stage, index))
                reading = self.critic.read(
                    image,
                    prompt_check.prompt,
                    seed=seed,
                    mode=values.guidance_mode,
                    critique=critique,
                    write_critique=writes,
                    max_new_tokens=values.max_critique_tokens,
                    on_text=lambda text: report(StageEvent("critique", index, text=text)),
                )
            with self._stage("image_features", seconds):
                report(StageEvent("image_features", index))
                image_features = base.image_features if base is not None else None
                if image_features is None:
                    image_features = self.backend.image_features(image)
                    if base is not None:
                        base.image_features = image_features
            with self._stage("align", seconds):
                report(StageEvent("align", index))
                with torch.no_grad():
                    aligned_features = self.aligner.align(
                        image_features.to(self.device), reading.guidance.to(self.device), passes=values.aligner_passes
                    ).float().cpu()
            with self._stage("regenerate", seconds):
                report(StageEvent("regenerate", index, 0, values.steps))
                call = self._call(prompt_check.prompt, seed, values)
                new_image = self.backend.regenerate(
                    call, aligned_features, self._step_reporter(report, "regenerate", index)
                )
        report(StageEvent("done", index))
        return Round(
            index,
            new_image,
            prompt_check.prompt,
            seed,
            "refined",
            critique=critique if critique is not None else reading.critique,
            guidance_mode=values.guidance_mode,
            question=reading.question,
            question_source=self.critic.questions.name,
            base_index=base_index if base_index is not None else (base.index if base is not None else index - 1),
            settings=values.to_dict(),
            seconds=seconds,
            warnings=list(prompt_check.warnings),
        )

    def score(self, made: Round, scorers: list[str] | tuple[str, ...]) -> dict[str, float]:
        """Alignment scores of a round against its prompt (img_core.evaluation.scorers: `vqascore` asks this session's
        MLLM; others load their own weights once). They are recorded in `made.scores` and returned."""
        from img_core.evaluation.scorers import check_scorer_names, load_scorer

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
        prompt: str,
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
            from img_core.evaluation.scorers import check_scorer_names

            check_scorer_names(list(scorers))
        settings = settings or RoundSettings()
        settings.resolve(self.base_preset)
        check_seed(seed)
        check_prompt(prompt)
        if image is not None:
            image = load_image(image)
        first = (
            self.start_from_image(image, prompt, seed)
            if image is not None
            else self.generate(prompt, seed, settings, on_stage=on_stage)
        )
        record = SessionRecord(first.prompt, first.seed, self.base_preset.name, [first])
        if scorers:
            self.score(first, scorers)
        for index in range(1, rounds + 1):
            made = self.refine(record.rounds[-1], first.prompt, first.seed, None, settings, index=index, on_stage=on_stage)
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
        """Load the models (once), passing loading messages on as "load" stage events."""
        if not self.is_loaded:
            self.load(progress=lambda message: report(StageEvent("load", round_index, message=message)))

    @staticmethod
    def _step_reporter(report: StageCallback, stage: str, round_index: int):
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
__all__ = ["IMGSession", "Round", "RoundSettings", "SessionRecord", "StageEvent", "StageCallback"]


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
