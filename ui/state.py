"""Typed values the UI works with: one request per click, one state per browser session.

`RoundRequest` is what the widgets say, read by name (never a positional list). `StudioState` is one
browser session's rounds; it lives in a `gr.State`, so two users never share rounds. Both are plain,
picklable dataclasses (ZeroGPU pickles the arguments of GPU functions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from img_core.errors import InvalidInputError

if TYPE_CHECKING:
    from img_core.session import Round, RoundSettings

GUIDANCE_MODES = ("question", "dialogue")
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class RoundRequest:
    """The settings of one Generate / Refine click, validated."""

    prompt: str
    seed: int
    steps: int | None = None  # None: the preset's default
    guidance_scale: float | None = None  # None: the preset's default
    ip_scale: float = 0.2
    aligner_passes: int = 3
    guidance_mode: str = "question"

    @classmethod
    def from_values(cls, **values: Any) -> RoundRequest:
        """Build from raw widget values (Gradio numbers arrive as floats or None), raising
        InvalidInputError with a message for the user on anything unusable."""
        prompt = (values.get("prompt") or "").strip()
        if not prompt:
            raise InvalidInputError("the prompt is empty: describe the image you want")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidInputError(f"the prompt has {len(prompt)} characters; keep it under {MAX_PROMPT_CHARS}")
        seed = _whole_number("seed", values.get("seed"), low=0, high=MAX_SEED)
        steps = values.get("steps")
        steps = None if steps is None else _whole_number("steps", steps, low=1, high=500)
        guidance_scale = values.get("guidance_scale")
        if guidance_scale is not None and not 0 <= float(guidance_scale) <= 50:
            raise InvalidInputError(f"guidance scale must be between 0 and 50, got {guidance_scale}")
        ip_scale = float(values.get("ip_scale", cls.ip_scale))
        if not 0 <= ip_scale <= 2:
            raise InvalidInputError(f"IP scale must be between 0 and 2, got {ip_scale}")
        aligner_passes = _whole_number("aligner passes", values.get("aligner_passes", cls.aligner_passes), 1, 10)
        guidance_mode = values.get("guidance_mode") or cls.guidance_mode
        if guidance_mode not in GUIDANCE_MODES:
            raise InvalidInputError(f"guidance mode must be one of {GUIDANCE_MODES}, got {guidance_mode!r}")
        return cls(
            prompt=prompt,
            seed=seed,
            steps=steps,
            guidance_scale=None if guidance_scale is None else float(guidance_scale),
            ip_scale=ip_scale,
            aligner_passes=aligner_passes,
            guidance_mode=guidance_mode,
        )

    def settings(self) -> RoundSettings:
        from img_core.session import RoundSettings

        return RoundSettings(
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            ip_scale=self.ip_scale,
            aligner_passes=self.aligner_passes,
            guidance_mode=self.guidance_mode,
        )


def _whole_number(name: str, value: Any, low: int, high: int) -> int:
    if value is None or value == "":
        raise InvalidInputError(f"{name} is missing: enter a whole number from {low} to {high}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a whole number, got {value!r}") from None
    if number != int(number) or not low <= number <= high:
        raise InvalidInputError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


@dataclass
class StudioState:
    """One browser session's rounds: round i sits at `rounds[i]` (its `base_index` says which round it
    was refined from); `base` is the round the next Refine starts from."""

    rounds: list[Round] = field(default_factory=list)
    base: int | None = None

    @property
    def is_empty(self) -> bool:
        return not self.rounds

    @property
    def next_index(self) -> int:
        return len(self.rounds)

    def base_round(self) -> Round:
        if self.base is None:
            raise InvalidInputError("there is no image yet: Generate one or start from your own image first")
        return self.rounds[self.base]

    def started(self, first: Round) -> StudioState:
        """A new session whose round 0 is `first` (Generate or an uploaded image)."""
        return StudioState(rounds=[dataclasses.replace(first, index=0, base_index=None)], base=0)

    def extended(self, refined: Round) -> StudioState:
        """This session plus `refined` (made from the current base); the new round becomes the base."""
        refined = dataclasses.replace(refined, index=self.next_index, base_index=self.base)
        return StudioState(rounds=[*self.rounds, refined], base=refined.index)

    def with_base(self, index: int) -> StudioState:
        if not 0 <= index < len(self.rounds):
            raise InvalidInputError(f"there is no round {index}; this session has {len(self.rounds)} rounds")
        return dataclasses.replace(self, base=index)
