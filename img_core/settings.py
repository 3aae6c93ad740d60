"""Every user-facing setting in one place: its default, its range, its check and its command-line flag.

Two kinds of settings:
  * `RoundSettings` - the knobs of one round (steps, guidance scale, IP scale, aligner passes, guidance
    mode, critique length). `None` means "the preset's default"; `resolve(preset)` gives the concrete
    `ResolvedSettings` a round records. All limits live in `LIMITS` and are checked in one place,
    `RoundSettings.check` (diffusers' `check_inputs` style: each error names the setting and the value,
    nothing is silently rounded).
  * `ModelOptions` - what a session loads (preset, device, MLLM and its quantization, aligner, offload,
    question source). `add_model_arguments` adds the same flags to the app's and the CLI's parsers.

The sliders of the app, the CLI flags, the API, `evaluate` and the trainer read their ranges and defaults
from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from img_core.errors import InvalidInputError
from img_core.presets import PRESETS, Preset

# How the MLLM computes guidance features (`MLLMCritic.read`, aligner training, feature extraction):
# question: over image + question, as released; dialogue: the critique teacher-forced after the question.
MLLM_GUIDANCE_MODES = ("question", "dialogue")
# The round setting: "auto" picks per round - dialogue over the critique when the user edited it (or typed
# one), else question mode (the released aligners' training condition: default results stay the paper's).
GUIDANCE_MODES = ("auto", *MLLM_GUIDANCE_MODES)
DEFAULT_GUIDANCE_MODE = "auto"
MLLM_QUANTIZATIONS = ("none", "bnb-nf4", "bnb-8bit", "quanto-int8", "quanto-int4")
DIFFUSION_QUANTIZATIONS = ("none", "bnb-nf4", "bnb-8bit")
MAX_PROMPT_CHARS = 2000  # longer prompts are cut here, with a warning (the text encoders take far less)


@dataclass(frozen=True)
class Limit:
    """The allowed range of a numeric setting, and the step a slider moves by."""

    low: float
    high: float
    step: float
    whole: bool  # must be a whole number
    label: str

    def check(self, name: str, value: Any) -> int | float:
        """`value` as an int/float inside the range; InvalidInputError naming `name` otherwise."""
        kind = "a whole number" if self.whole else "a number"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidInputError(f"{name} must be {kind} from {_show(self.low)} to {_show(self.high)}, got {_brief(value)}")
        integral = isinstance(value, numbers.Integral)  # any size: float() would round or overflow it
        if not integral and not math.isfinite(float(value)):
            raise InvalidInputError(f"{name} must be a finite number, got {_brief(value)}")
        if self.whole and not integral and not float(value).is_integer():
            raise InvalidInputError(f"{name} must be a whole number, got {_brief(value)}")
        if not self.low <= value <= self.high:
            raise InvalidInputError(f"{name} must be from {_show(self.low)} to {_show(self.high)}, got {_brief(value)}")
        return int(value) if self.whole else float(value)


def _brief(value: Any, chars: int = 40) -> str:
    """`repr(value)`, cut to `chars` characters (a message never echoes a 300-digit number)."""
    shown = repr(value)
    return shown if len(shown) <= chars else shown[: chars - 1] + "…"


LIMITS: dict[str, Limit] = {
    "steps": Limit(1, 200, 1, True, "denoising steps"),
    "guidance_scale": Limit(0.0, 30.0, 0.5, False, "guidance scale (CFG; FLUX: distilled guidance)"),
    "ip_scale": Limit(0.0, 1.0, 0.05, False, "IP-Adapter scale of the re-generation"),
    "aligner_passes": Limit(0, 10, 1, True, "aligner passes (0 = no alignment)"),
    "max_critique_tokens": Limit(8, 512, 8, True, "longest critique, in tokens"),
    "seed": Limit(0, 2**32 - 1, 1, True, "seed"),
    "rounds": Limit(0, 20, 1, True, "IMG rounds after the initial image"),
    "auto_rounds": Limit(1, 5, 1, True, "rounds for Auto-refine"),
}
DEFAULT_MAX_CRITIQUE_TOKENS = 96
DEFAULT_AUTO_ROUNDS = 3


def check_seed(seed: Any) -> int:
    """The seed as an int; whole numbers in range only (1.5, True, "7" and NaN are refused)."""
    return LIMITS["seed"].check("seed", seed)


def check_rounds(rounds: Any) -> int:
    return LIMITS["rounds"].check("rounds", rounds)


@dataclass(frozen=True)
class CheckedPrompt:
    """A prompt ready to use, and the warnings to show the user about it. Checked once per click: every
    round method takes a CheckedPrompt as it is. `encoders` names the preset whose text encoders' token
    limits were checked too (`IMGSession.check_prompt`); None when only the characters were."""

    prompt: str
    warnings: tuple[str, ...] = ()
    encoders: str | None = None


def check_prompt(prompt: Any) -> CheckedPrompt:
    """Strip the prompt; refuse a missing, non-text or blank one; cut one over `MAX_PROMPT_CHARS` with a
    warning. A `CheckedPrompt` is returned as it is (it was checked already)."""
    if isinstance(prompt, CheckedPrompt):
        return prompt
    if prompt is None:
        raise InvalidInputError("the prompt is empty: describe the image you want")
    if not isinstance(prompt, str):
        raise InvalidInputError(f"the prompt must be text, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise InvalidInputError("the prompt is empty: describe the image you want")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone UTF-16 surrogate (JSON "\ud800"): no character at all
        raise InvalidInputError(
            f"the prompt is not valid text (character {error.start + 1} is half of a UTF-16 pair); type it again"
        ) from None
    if len(prompt) > MAX_PROMPT_CHARS:
        cut = len(prompt) - MAX_PROMPT_CHARS
        return CheckedPrompt(
            prompt[:MAX_PROMPT_CHARS].rstrip(),
            (f"the prompt has {len(prompt)} characters; its last {cut} were cut (the limit is {MAX_PROMPT_CHARS})",),
        )
    return CheckedPrompt(prompt)


@dataclass(frozen=True)
class ResolvedSettings:
    """Concrete values of one round (what a round records)."""

    steps: int
    guidance_scale: float
    ip_scale: float
    aligner_passes: int
    guidance_mode: str
    max_critique_tokens: int
    critique: bool
    width: int
    height: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RoundSettings:
    """The knobs of a round; None means the preset's default (`Preset.default_steps`, ...)."""

    steps: int | None = None
    guidance_scale: float | None = None
    ip_scale: float | None = None  # preset default 0.2 (REFERENCE §4)
    aligner_passes: int | None = None  # preset default 3 (REFERENCE §1)
    guidance_mode: str = DEFAULT_GUIDANCE_MODE
    max_critique_tokens: int = DEFAULT_MAX_CRITIQUE_TOKENS
    # Question mode only: False skips the critique text (the release's path; guidance needs no text).
    critique: bool = True

    def check(self) -> None:
        """Every limit, in one place. Raises InvalidInputError naming the setting and the value."""
        for name in ("steps", "guidance_scale", "ip_scale", "aligner_passes", "max_critique_tokens"):
            value = getattr(self, name)
            if value is not None:
                LIMITS[name].check(name.replace("_", " "), value)
        if self.guidance_mode not in GUIDANCE_MODES:
            raise InvalidInputError(f"guidance mode must be one of {GUIDANCE_MODES}, got {self.guidance_mode!r}")
        if not isinstance(self.critique, bool):
            raise InvalidInputError(f"critique must be true or false, got {self.critique!r}")
        if self.guidance_mode == "dialogue" and not self.critique:
            raise InvalidInputError("dialogue mode is guided by the critique: it cannot run without one")

    def resolve(self, preset: Preset) -> ResolvedSettings:
        """Checked, concrete values for `preset`."""
        self.check()

        def pick(value, default):
            return default if value is None else value

        return ResolvedSettings(
            steps=int(pick(self.steps, preset.default_steps)),
            guidance_scale=float(pick(self.guidance_scale, preset.default_guidance_scale)),
            ip_scale=float(pick(self.ip_scale, preset.ip_scale)),
            aligner_passes=int(pick(self.aligner_passes, preset.aligner_passes)),
            guidance_mode=self.guidance_mode,
            max_critique_tokens=int(self.max_critique_tokens),
            critique=self.critique,
            width=preset.width,
            height=preset.height,
        )

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> RoundSettings:
        """From raw values by name (widgets, API, JSON); unknown names are refused, values checked."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown round settings: {sorted(unknown)}")
        settings = cls(**values)
        settings.check()
        return settings


def add_round_arguments(parser: argparse.ArgumentParser) -> None:
    """The per-round flags (`--steps`, `--guidance-scale`, `--ip-scale`, `--passes`, `--guidance-mode`,
    `--max-critique-tokens`, `--no-critique`); read them back with `round_settings_from_args`."""
    parser.add_argument("--steps", type=int, default=None, help=f"{LIMITS['steps'].label} (default: the preset's)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help=f"{LIMITS['guidance_scale'].label} (default: the preset's)")
    parser.add_argument("--ip-scale", type=float, default=None,
                        help=f"{LIMITS['ip_scale'].label} (default: the preset's, 0.2)")
    parser.add_argument("--passes", type=int, default=None, help=f"{LIMITS['aligner_passes'].label} (default 3)")
    parser.add_argument("--guidance-mode", choices=GUIDANCE_MODES, default=DEFAULT_GUIDANCE_MODE,
                        help="question: guidance over image + question, as released; dialogue: the critique is "
                        "teacher-forced as the MLLM's answer, so it steers the guidance; auto (default): dialogue "
                        "when a critique you wrote or edited is given, else question")
    parser.add_argument("--max-critique-tokens", type=int, default=DEFAULT_MAX_CRITIQUE_TOKENS,
                        help=f"{LIMITS['max_critique_tokens'].label} (default {DEFAULT_MAX_CRITIQUE_TOKENS})")
    parser.add_argument("--no-critique", action="store_true",
                        help="question mode: do not write the critique text (the release's path, a little faster)")


def round_settings_from_args(args: argparse.Namespace) -> RoundSettings:
    settings = RoundSettings(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        ip_scale=args.ip_scale,
        aligner_passes=args.passes,
        guidance_mode=args.guidance_mode,
        max_critique_tokens=args.max_critique_tokens,
        critique=not args.no_critique,
    )
    settings.check()
    return settings


@dataclass(frozen=True)
class ModelOptions:
    """What a session loads. None means automatic (see each flag's help)."""

    preset: str | None = None
    device: str | None = None
    quantization: str | None = None
    diffusion_quantization: str | None = None
    mllm: str | None = None
    aligner: str | None = None
    offload: bool | None = None
    questions: str | None = None



# Environment variables that set the defaults of --preset, --mllm and --quantization (a Hugging Face Space
# passes no flags to app.py; it sets these as Space variables). Empty means unset.
MODEL_ENVIRONMENT = {"preset": "IMG_PRESET", "mllm": "IMG_MLLM", "quantization": "IMG_QUANTIZATION"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags shared by `app.py` and `python -m img_core refine/evaluate`; --preset, --mllm and
    --quantization default to $IMG_PRESET, $IMG_MLLM and $IMG_QUANTIZATION when set (`MODEL_ENVIRONMENT`)."""
    import os


    # Not checked here (argparse checks only typed values): the session refuses an unknown preset or quantization.
    from_env = {name: os.environ.get(variable) or None for name, variable in MODEL_ENVIRONMENT.items()}
    parser.add_argument("--preset", choices=sorted(PRESETS), default=from_env["preset"],
                        help="model preset; default: $IMG_PRESET, else sdxl with a CUDA GPU, else tiny-sdxl (tiny "
                        "random models)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    parser.add_argument("--quantization", choices=MLLM_QUANTIZATIONS, default=from_env["quantization"],
                        help="MLLM weights (default: $IMG_QUANTIZATION, else bnb-nf4 on CUDA, none on CPU)")
    parser.add_argument("--diffusion-quantization", choices=DIFFUSION_QUANTIZATIONS, default=None,
                        help="the big diffusion components on CUDA (default: bnb-nf4 for flux-dev, else none)")
    parser.add_argument("--mllm", default=from_env["mllm"], help="MLLM name (img-llava-13b, llava-1.5-13b, "
                        "qwen2.5-vl-7b) or a converted model folder (default: $IMG_MLLM, else the preset's)")
    parser.add_argument("--aligner", default=None, help="aligner folder (save_pretrained) or official .pth "
                        "(default: the preset's)")
    parser.add_argument("--offload", action="store_true", default=None,
                        help="CPU-offload the diffusion pipeline (less GPU memory; default: automatic when the GPU "
                        "is smaller than the preset's estimated need)")
    parser.add_argument("--questions", default=None,
                        help="question source: 'ours' (100 own paraphrases), 'release' (the authors' list, fetched "
                        "once and cached) or a JSON file of strings with {prompt} (default: the preset's)")


def model_options_from_args(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(
        preset=args.preset,
        device=args.device,
        quantization=args.quantization,
        diffusion_quantization=args.diffusion_quantization,
        mllm=args.mllm,
        aligner=args.aligner,
        offload=args.offload,
        questions=args.questions,
    )


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
