"""How a StudioState looks: captions, the round log, labels and which buttons can run. Pure functions
of plain values, so they are tested without a browser."""

from __future__ import annotations

import html

from ui.image_files import png_file
from ui.state import StudioState

CAPTION_CRITIQUE_CHARS = 70

TINY_BANNER = (
    "⚠️ **Tiny random models.** This app runs the `{preset}` preset: every model is a tiny network with "
    "random weights, so the images are noise. It is for trying the app on a CPU. On a machine with a CUDA "
    "GPU run `python app.py --preset sdxl` (or `flux-dev`) for real images."
)

CRITIQUE_NOTES = {
    "dialogue": (
        "**Dialogue mode:** the next Refine is guided by the critique in the box above, *with your edits*. "
        "Leave it empty and the MLLM critiques the base image itself."
    ),
    "question": (
        "**Question mode** (as in the paper): the critique is shown for reading only; guidance uses the "
        "MLLM's question alone, so edits to the critique do not change the next round. Switch to "
        "*dialogue* under Advanced settings to let your edits steer it."
    ),
}

BUTTONS = ("generate", "use_upload", "critique", "refine", "auto_refine", "reset", "download", "switch")
NEEDS_ROUNDS = ("critique", "refine", "auto_refine", "reset", "download")


def button_states(state: StudioState | None, busy: bool) -> dict[str, bool]:
    """Which buttons can run now: none while a job of this session runs; the round buttons only once
    there is a round."""
    has_rounds = state is not None and not state.is_empty
    return {name: not busy and (has_rounds or name not in NEEDS_ROUNDS) for name in BUTTONS}


def round_origin(state: StudioState, index: int) -> str:
    item = state.rounds[index]
    if item.source == "uploaded":
        return "your image"
    if item.source == "generated" or item.base_index is None:
        return "generated"
    return f"refined from round {item.base_index}, {item.guidance_mode} mode"


def round_caption(state: StudioState, index: int) -> str:
    item = state.rounds[index]
    caption = f"Round {index} · {round_origin(state, index)}"
    if index == state.base:
        caption += " · base of next round"
    if item.critique:
        critique = item.critique.strip().replace("\n", " ")
        if len(critique) > CAPTION_CRITIQUE_CHARS:
            critique = critique[: CAPTION_CRITIQUE_CHARS - 1].rstrip() + "…"
        caption += f" · “{critique}”"
    return caption


def gallery_items(state: StudioState) -> list[tuple[str, str]]:
    """(PNG path, caption) for every round, oldest first."""
    return [(png_file(item.image), round_caption(state, index)) for index, item in enumerate(state.rounds)]


def base_label(state: StudioState) -> str:
    if state.base is None:
        return "Base of the next round"
    return f"Round {state.base}: base of the next round"


def critique_label(state: StudioState) -> str:
    if state.base is None:
        return "Critique (editable)"
    return f"Critique of round {state.base} (editable)"


def round_log(state: StudioState) -> str:
    """Markdown: every round with where it came from, its timings and the critique it was made from."""
    if state.is_empty:
        return "*No rounds yet. Generate an image, or start from your own.*"
    blocks = []
    for index, item in enumerate(state.rounds):
        seconds = sum(item.seconds.values()) if item.seconds else 0.0
        lines = [f"**Round {index}** — {round_origin(state, index)} · seed {item.seed} · {seconds:.1f} s"]
        if index == state.base:
            lines[0] += " · **base of the next round**"
        quoted = []
        if item.critique:
            used = "steered this round" if item.guidance_mode == "dialogue" else "shown only; question-mode guidance"
            quoted.append(f"> *Critique ({used}):* {_one_line(item.critique)}")
        if item.question and item.source == "refined":
            quoted.append(f"> *Question:* {_one_line(item.question)}")
        if quoted:
            lines.append("\n>\n".join(quoted))
        blocks.append("\n\n".join(lines))
    return "\n\n".join(blocks)


def _one_line(text: str) -> str:
    return html.escape(" ".join(text.split()))
