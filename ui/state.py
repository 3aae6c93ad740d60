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
from img_core.settings import (
    GUIDANCE_MODES,
    CheckedPrompt,
    RoundSettings,
    check_prompt,
    check_seed,
)
from ui.history import new_session_id

if TYPE_CHECKING:
    from img_core.record import Round

# The page's guidance choices: "auto" (the default) lets an edited critique steer (dialogue guidance) and
# keeps the release's question-mode guidance otherwise; the others force a mode of img_core.settings.
GUIDANCE_CHOICES = tuple(dict.fromkeys(("auto", *GUIDANCE_MODES)))


def critique_edited(text: str | None, mllm_text: str | None) -> bool:
    """The critique box holds text the user typed or changed: anything but what the MLLM wrote for the base
    (`mllm_text`, kept by the page since Critique was clicked; an empty box is not an edit)."""
    text = (text or "").strip()
    return bool(text) and text != (mllm_text or "").strip()


def effective_guidance(choice: str | None, critique: str | None, mllm_text: str | None) -> str:
    """The guidance mode a round gets: `choice`, with "auto" resolved from whether the critique box holds
    an edit (dialogue) or not (question)."""
    if choice in (None, "", "auto"):
        return "dialogue" if critique_edited(critique, mllm_text) else "question"
    return choice


MIN_SCORE_DIGITS = 3  # decimals a score is shown with at least ...
MAX_SCORE_DIGITS = 6  # ... and at most (the tiny models' scores differ in the 4th or 5th)


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


    @property
    def checked_prompt(self) -> CheckedPrompt:
        """The prompt as `from_values` checked it (its characters): `IMGSession.check_prompt` adds the token
        check once per click and no round method checks it again."""
        return CheckedPrompt(self.prompt, self.warnings)


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
    # The rounds a critique the user edited steered (dialogue guidance).
    edited: frozenset[int] = frozenset()
    session_id: str = ""  # the History's id of this session (ui.history)

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

    def extended(self, refined: Round, edited: bool = False) -> StudioState:
        """This session plus `refined` (made from the current base; `edited`: steered by a critique the user
        edited); the new round becomes the base."""
        refined = dataclasses.replace(refined, index=self.next_index, base_index=self.base)
        steered = self.edited | {refined.index} if edited else self.edited
        return dataclasses.replace(self, rounds=[*self.rounds, refined], base=refined.index, edited=steered)

    def with_base(self, index: int) -> StudioState:
        if not 0 <= index < len(self.rounds):
            raise InvalidInputError(f"there is no round {index}; this session has {len(self.rounds)} rounds")
        return dataclasses.replace(self, base=index)

    def score_digits(self, scorer: str | None) -> int:
        """How many decimals the page shows `scorer`'s scores with: the fewest (from MIN_SCORE_DIGITS) at
        which every two different scores of this session still differ, at most MAX_SCORE_DIGITS."""
        values = sorted({item.scores[scorer] for item in self.rounds if scorer in item.scores})
        for digits in range(MIN_SCORE_DIGITS, MAX_SCORE_DIGITS):
            if len({round(value, digits) for value in values}) == len(values):
                return digits
        return MAX_SCORE_DIGITS

    def shown_score(self, index: int, scorer: str | None) -> float | None:
        """Round `index`'s `scorer` score as the page shows it (rounded to `score_digits`); None if unscored.
        The star and Auto-refine's stop rule compare these, so they agree with what people read."""
        value = self.rounds[index].scores.get(scorer) if scorer else None
        return None if value is None else round(value, self.score_digits(scorer))

    def best_index(self, scorer: str | None) -> int | None:
        """The round with the highest shown `scorer` score (the earliest on a tie); None when fewer than two
        rounds are scored, since a best of one says nothing."""
        shown = [(self.shown_score(index, scorer), -index) for index in range(len(self.rounds))]
        scored = [pair for pair in shown if pair[0] is not None]
        if len(scored) < 2:
            return None
        return -max(scored)[1]
