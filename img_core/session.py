"""An IMG session: one loaded stack (diffusion backend + MLLM critic + Implicit Aligner) and the rounds
it makes. This is the API the CLI, the app and the trainer call.

One round of IMG (REFERENCE §1), from a base image and its prompt:
    1. critique       the MLLM's misalignment analysis as text (shown, editable, recorded)
    2. guidance       MLLM last-layer hidden states over the conversation      (1, Sg, Dg)
    3. image features IP-Adapter tokens of the base image                      (1, Si, D)
    4. align          the Implicit Aligner applied `aligner_passes` times      (1, Si, D)
    5. regenerate     same prompt and seed, aligned tokens at `ip_scale`
Round 0 is the base model's own image (or the user's). Same inputs and seed give the same images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from img_core.aligner import ImplicitAligner
from img_core.backends.base import require_prompt
from img_core.errors import IncompatibleAlignerError, InvalidInputError, OutOfMemoryError
from img_core.images import load_image
from img_core.presets import Preset, get_preset

logger = logging.getLogger(__name__)

GUIDANCE_MODES = ("question", "dialogue")
ProgressCallback = Callable[[str], None]


@dataclass
class RoundSettings:
    """Per-round knobs; None means "the preset's default"."""

    steps: int | None = None
    guidance_scale: float | None = None
    ip_scale: float | None = None  # REFERENCE §4: 0.2
    aligner_passes: int | None = None  # REFERENCE §1: 3
    guidance_mode: str = "question"  # "question" (as released) | "dialogue" (critique steers guidance)
    max_critique_tokens: int = 96

    def resolve(self, preset: Preset) -> dict:
        """Concrete values for this preset, validated."""
        values = {
            "steps": int(self.steps if self.steps is not None else preset.default_steps),
            "guidance_scale": float(
                self.guidance_scale if self.guidance_scale is not None else preset.default_guidance_scale
            ),
            "ip_scale": float(self.ip_scale if self.ip_scale is not None else preset.ip_scale),
            "aligner_passes": int(self.aligner_passes if self.aligner_passes is not None else preset.aligner_passes),
            "guidance_mode": self.guidance_mode,
            "width": preset.width,
            "height": preset.height,
        }
        if values["steps"] < 1 or values["steps"] > 500:
            raise InvalidInputError(f"steps must be between 1 and 500, got {values['steps']}")
        if not 0.0 <= values["ip_scale"] <= 2.0:
            raise InvalidInputError(f"ip_scale must be between 0 and 2, got {values['ip_scale']}")
        if not 0 <= values["aligner_passes"] <= 10:
            raise InvalidInputError(f"aligner_passes must be between 0 and 10, got {values['aligner_passes']}")
        if values["guidance_scale"] < 0:
            raise InvalidInputError(f"guidance_scale must be >= 0, got {values['guidance_scale']}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise InvalidInputError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {self.guidance_mode!r}")
        return values


@dataclass
class Round:
    """One image of a session and how it was made."""

    index: int
    image: Image.Image
    prompt: str
    seed: int
    source: str  # "generated" | "uploaded" | "refined"
    critique: str | None = None  # the critique this round was re-generated from
    guidance_mode: str | None = None
    question: str | None = None
    base_index: int | None = None  # the round it was refined from
    settings: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image"}
        values["image_file"] = f"round_{self.index}.png"
        values["seconds"] = {stage: round(value, 4) for stage, value in self.seconds.items()}
        return values


@dataclass
class SessionRecord:
    """All rounds of one prompt: what `session.json` (CLI, app download) holds, plus the images."""

    prompt: str
    seed: int
    preset: str
    rounds: list[Round] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return {
            "format": "img-session/1",
            "prompt": self.prompt,
            "seed": self.seed,
            "preset": self.preset,
            "created": self.created,
            "rounds": [r.to_dict() for r in self.rounds],
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write round_0.png, round_1.png, ... and session.json into `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for r in self.rounds:
            r.image.save(out_dir / f"round_{r.index}.png")
        (out_dir / "session.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out_dir / "session.json"

    def write_zip(self, path: str | Path) -> Path:
        """The same files as `save`, in one zip archive."""
        path = Path(path)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for r in self.rounds:
                buffer = io.BytesIO()
                r.image.save(buffer, format="PNG")
                archive.writestr(f"round_{r.index}.png", buffer.getvalue())
            archive.writestr("session.json", json.dumps(self.to_dict(), indent=2) + "\n")
        return path


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
    ):
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base_preset = preset
        self.quantization = quantization
        self.mllm_name = mllm or preset.mllm
        self.aligner_source = aligner
        self.offload = offload
        self.diffusion_quantization = diffusion_quantization
        self.tiny_root = Path(tiny_root) if tiny_root else None
        self.show_progress_bars = show_progress_bars
        self.preset = preset  # resolved to absolute tiny paths on load
        self.backend = None
        self.critic = None
        self.aligner: ImplicitAligner | None = None
        self.load_seconds: dict[str, float] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "IMGSession":
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

    def load(self, progress: ProgressCallback | None = None, aligner: bool = True) -> "IMGSession":
        """Load the diffusion backend, the MLLM critic and the aligner (each once), then check they fit.

        `aligner=False` loads only the backend and the critic (feature extraction needs no aligner)."""
        with self._lock:
            if self.is_loaded or (not aligner and self.backend is not None and self.critic is not None):
                return self
            say = progress or (lambda message: logger.info(message))
            if self.base_preset.is_tiny and self.preset is self.base_preset:
                from img_core.tiny import ensure_tiny_models

                say("building/loading the tiny random-weight models")
                self.tiny_root = ensure_tiny_models(self.tiny_root)
                self.preset = self.base_preset.resolved(self.tiny_root)
            preset = self.preset

            from img_core.backends import backend_class
            from img_core.mllm import MLLMCritic, default_quantization, resolve_spec

            if self.backend is None:
                if self.offload is None:
                    self.offload = self._auto_offload(say)
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
                    spec = resolve_spec(self.mllm_name, self.tiny_root)
                    quantization = self.quantization or default_quantization(self.device)
                    say(f"loading the MLLM {spec.model_id} (quantization: {quantization})")
                    self.critic = MLLMCritic.load(spec, device=self.device, quantization=quantization)
            if aligner and self.aligner is None:
                with self._stage("load_aligner", self.load_seconds):
                    say("loading the Implicit Aligner")
                    loaded = self._load_aligner().to(self.device, dtype=torch.float32).eval()
                self._check_compatible(loaded)
                self.aligner = loaded
            say("models loaded")
            return self

    def _auto_offload(self, say: ProgressCallback) -> bool:
        """offload=None: CPU-offload the pipeline when the GPU is smaller than the preset's estimate."""
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

    def generate(self, prompt: str, seed: int, settings: RoundSettings | None = None) -> Round:
        """Round 0: the base model's image for `prompt` and `seed`."""
        settings = settings or RoundSettings()
        values = settings.resolve(self.base_preset)
        seed = _check_seed(seed)
        require_prompt(prompt)  # cheap checks first: bad input never waits for a model load
        self.load()
        with self._lock:
            check = self.backend.check_prompt(prompt)
            seconds: dict[str, float] = {}
            with self._stage("generate", seconds):
                image = self.backend.generate(
                    check.prompt, seed, values["steps"], values["guidance_scale"], values["width"], values["height"]
                )
        return Round(0, image, check.prompt, seed, "generated", settings=values, seconds=seconds, warnings=check.warnings)

    def start_from_image(self, image, prompt: str, seed: int = 0) -> Round:
        """Round 0 from the user's own image (any size/mode; converted to RGB, huge images resized)."""
        image = load_image(image)
        seed = _check_seed(seed)
        require_prompt(prompt)
        self.load()
        check = self.backend.check_prompt(prompt)
        return Round(0, image, check.prompt, seed, "uploaded", warnings=check.warnings)

    def critique(self, image, prompt: str, max_new_tokens: int = 96, seed: int = 0) -> str:
        """The MLLM's analysis of how `image` misses `prompt`."""
        image = load_image(image)
        require_prompt(prompt)
        self.load()
        with self._lock:
            check = self.backend.check_prompt(prompt)
            with self._stage("critique", {}):
                return self.critic.critique(image, check.prompt, max_new_tokens=max_new_tokens, seed=_check_seed(seed))

    def refine(
        self,
        image,
        prompt: str,
        seed: int,
        critique: str | None = None,
        settings: RoundSettings | None = None,
        index: int = 1,
        base_index: int | None = None,
    ) -> Round:
        """One IMG round from `image`. Without a critique, the MLLM writes one first (it is recorded, and
        in dialogue mode it is what steers the guidance)."""
        settings = settings or RoundSettings()
        values = settings.resolve(self.base_preset)
        seed = _check_seed(seed)
        image = load_image(image)
        if critique is not None and not str(critique).strip():
            critique = None
        require_prompt(prompt)
        self.load()
        with self._lock:
            check = self.backend.check_prompt(prompt)
            seconds: dict[str, float] = {}
            if critique is None:
                with self._stage("critique", seconds):
                    critique = self.critic.critique(
                        image, check.prompt, max_new_tokens=settings.max_critique_tokens, seed=seed
                    )
            with self._stage("guidance", seconds):
                guidance = self.critic.guidance(
                    image, check.prompt, critique=critique, mode=values["guidance_mode"], seed=seed
                )
            with self._stage("image_features", seconds):
                image_features = self.backend.image_features(image)
            with self._stage("align", seconds):
                with torch.no_grad():
                    aligned_features = self.aligner.align(
                        image_features, guidance, passes=values["aligner_passes"]
                    ).float().cpu()
            with self._stage("regenerate", seconds):
                new_image = self.backend.regenerate(
                    check.prompt,
                    seed,
                    aligned_features,
                    values["ip_scale"],
                    values["steps"],
                    values["guidance_scale"],
                    values["width"],
                    values["height"],
                )
        return Round(
            index,
            new_image,
            check.prompt,
            seed,
            "refined",
            critique=critique,
            guidance_mode=values["guidance_mode"],
            question=self.critic.question_for(check.prompt, seed),
            base_index=base_index if base_index is not None else index - 1,
            settings=values,
            seconds=seconds,
            warnings=check.warnings,
        )

    def run(
        self,
        prompt: str,
        seed: int,
        rounds: int = 1,
        settings: RoundSettings | None = None,
        image=None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> SessionRecord:
        """Round 0 (generated, or `image`) then `rounds` IMG rounds, each from the previous image."""
        if rounds < 0 or rounds > 50:
            raise InvalidInputError(f"rounds must be between 0 and 50, got {rounds}")
        settings = settings or RoundSettings()
        settings.resolve(self.base_preset)
        _check_seed(seed)
        require_prompt(prompt)
        if image is not None:
            image = load_image(image)
        report = progress or (lambda stage, done, total: None)
        report("load", 0, rounds)
        self.load()
        report("round 0", 0, rounds)
        first = self.start_from_image(image, prompt, seed) if image is not None else self.generate(prompt, seed, settings)
        record = SessionRecord(first.prompt, first.seed, self.base_preset.name, [first])
        for index in range(1, rounds + 1):
            report(f"round {index}", index - 1, rounds)
            record.rounds.append(
                self.refine(record.rounds[-1].image, first.prompt, first.seed, None, settings, index=index)
            )
        report("done", rounds, rounds)
        return record

    # ------------------------------------------------------------------ helpers

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


def _check_seed(seed) -> int:
    try:
        seed = int(seed)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"the seed must be a whole number, got {seed!r}") from error
    if not 0 <= seed < 2**63:
        raise InvalidInputError(f"the seed must be between 0 and 2^63-1, got {seed}")
    return seed
