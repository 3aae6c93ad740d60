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
from img_core.settings import RoundSettings, check_prompt, check_seed
from ui.history import new_session_id

if TYPE_CHECKING:
    from img_core.record import Round


@dataclass(frozen=True)
class RoundRequest:
    """The settings of one Generate / Refine click, validated by img_core's checks (`img_core.settings`)."""

    prompt: str
    seed: int
    settings: RoundSettings = field(default_factory=RoundSettings)
    warnings: tuple[str, ...] = ()  # e.g. the prompt was cut to the length limit

    @classmethod
    def from_values(cls, prompt: Any = None, seed: Any = None, **settings: Any) -> RoundRequest:
        """Build from raw widget values by name (Gradio numbers arrive as floats or None; None settings
        mean the preset's default), raising InvalidInputError with a message for the user."""
        checked = check_prompt(prompt)
        if seed is None or seed == "":
            raise InvalidInputError("the seed is missing: enter a whole number")
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)  # Gradio's Number sends floats
        values = {name: _whole_if_float(value) for name, value in settings.items() if value is not None}
        return cls(checked.prompt, check_seed(seed), RoundSettings.from_values(values), checked.warnings)


def _whole_if_float(value: Any) -> Any:
    """Slider values of whole-number settings arrive as floats (3.0): the settings check refuses 3.5."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass
class StudioState:
    """One browser session's rounds: round i sits at `rounds[i]` (its `base_index` says which round it
    was refined from); `base` is the round the next Refine starts from. `session_id` names the session
    in the History (`ui.history`): Generate and an upload start a new one, Refine extends it."""

    rounds: list[Round] = field(default_factory=list)
    base: int | None = None
    session_id: str = ""

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
        first = dataclasses.replace(first, index=0, base_index=None)
        return StudioState(rounds=[first], base=0, session_id=new_session_id())

    def extended(self, refined: Round) -> StudioState:
        """This session plus `refined` (made from the current base); the new round becomes the base."""
        refined = dataclasses.replace(refined, index=self.next_index, base_index=self.base)
        return StudioState(rounds=[*self.rounds, refined], base=refined.index, session_id=self.session_id)

    def with_base(self, index: int) -> StudioState:
        if not 0 <= index < len(self.rounds):
            raise InvalidInputError(f"there is no round {index}; this session has {len(self.rounds)} rounds")
        return dataclasses.replace(self, base=index)

    def best_index(self, scorer: str | None) -> int | None:
        """The round with the highest `scorer` score (the earliest on a tie); None when fewer than two
        rounds are scored, since a best of one says nothing."""
        scored = [(item.scores[scorer], -index) for index, item in enumerate(self.rounds) if scorer in item.scores]
        if len(scored) < 2:
            return None
        return -max(scored)[1]
