"""How a StudioState looks: card captions, the status line, labels and which buttons can run. Pure
functions of plain values, so they are tested without a browser."""

from __future__ import annotations

import html
import re

from img_core.record import GUIDANCE_SOURCES, GUIDED_BY_EDIT, GUIDED_BY_MLLM, Round
from img_core.session import Stage, StageEvent
from ui.state import StudioState

TINY_BANNER = (
    "⚠️ **Tiny random models.** This app runs the `{preset}` preset: every model is a tiny network with "
    "random weights, so the images are noise. It is for trying the app on a CPU. On a machine with a CUDA "
    "GPU run `python app.py --preset sdxl` (or `flux-dev`) for real images."
)

CRITIQUE_NOTES = {
    "auto": (
        "**Auto** (the default): edit the critique above and your edit steers the next round (dialogue "
        "guidance); leave it as the MLLM wrote it, or empty, and the round gets the paper's question-mode "
        "guidance, so default results stay the paper's. The released aligners were trained on question-mode "
        "guidance: edits steer, but less precisely than an aligner trained on dialogue guidance would "
        "(`trainer` can train one)."
    ),
    "dialogue": (
        "**Dialogue mode:** the next Refine is guided by the critique in the box above, *with your edits*. "
        "Leave it empty and the MLLM critiques the base image itself."
    ),
    "question": (
        "**Question mode** (as in the paper): the critique is shown for reading only; guidance uses the "
        "MLLM's question alone, so edits to the critique do not change the next round. Choose *auto* or "
        "*dialogue* to let your edits steer it."
    ),
}

# What each scorer measures: the hover of a card's score (img_core.evaluation.scorers has the details).
SCORER_HOVERS = {
    "vqascore": "VQAScore: how sure the MLLM is that the image shows the prompt (P(yes) to 'Does this image "
    "show ...?'), 0 to 1; higher is better",
    "hpsv2": "HPS v2.1 (the paper's metric): how well the image matches the prompt as human raters prefer, "
    "100 x cosine of CLIP-H embeddings; higher is better",
    "pickscore": "PickScore: which image people would pick for the prompt, a CLIP-H score; higher is better",
    "clipscore": "CLIPScore: 100 x cosine of the image's and the prompt's CLIP ViT-L/14 embeddings; higher is better",
}
GUIDED_BY_EDIT_LABEL = "guided by your edit"  # a card's words for record.GUIDED_BY_EDIT

# Every button of the page and its label when it can run; the model buttons wait for the models.
BUTTON_LABELS = {
    "generate": "Generate",
    "use_upload": "Use it as round 0 (with the prompt above)",
    "critique": "Critique",
    "refine": "Refine",
    "auto_refine": "Auto-refine",
    "stop": "Stop",
    "reset": "Reset",
    "download": "Download every round (.zip)",
    "switch": "Switch models (affects everyone using this app)",
}
NEEDS_MODELS = ("generate", "use_upload", "critique", "refine", "auto_refine", "switch")
NEEDS_ROUNDS = ("critique", "refine", "auto_refine", "reset", "download")
NOTE_CHARS = 300  # longest question or critique quoted in the next-round note
REBASE_DURING_A_JOB = (
    "a job of this tab is running or waiting: 'Refine from here' works once it ends (or click Stop first)"
)
CARD_PROMPT_CHARS = 200  # longest prompt a round card shows (the full one is in its record and the zip)
RUNS_DURING_A_JOB = ("stop", "download")  # Stop ends the job; the download holds the rounds made so far

# What each stage of img_core.session.Stage is called on the page (every stage, no other keys).
STAGE_WORDS = {
    Stage.QUEUED: "waiting in the queue",
    Stage.LOAD: "loading models",
    Stage.GENERATE: "generating",
    Stage.CRITIQUE: "critique",
    Stage.GUIDANCE: "reading the guidance",
    Stage.IMAGE_FEATURES: "encoding the base image",
    Stage.ALIGN: "aligning",
    Stage.REGENERATE: "regenerating",
    Stage.SCORE: "scoring",
    Stage.DONE: "done",
    Stage.STOPPING: "stopping at the next step; the rounds made so far are kept",
}


def button_states(state: StudioState | None, busy: bool, preparing: bool = False) -> dict[str, bool]:
    """Which buttons can run now: during a job of this tab only Stop (and the download of the rounds
    so far); the model buttons not while the models are being prepared; the round buttons only once
    there is a round."""
    has_rounds = state is not None and not state.is_empty
    states = {}
    for name in BUTTON_LABELS:
        if busy:
            can = name in RUNS_DURING_A_JOB and (name == "stop" or has_rounds)
        else:
            can = name != "stop" and (has_rounds or name not in NEEDS_ROUNDS)
            can = can and not (preparing and name in NEEDS_MODELS)
        states[name] = can
    return states


def button_label(name: str, preparing_step: str | None) -> str:
    """The label of a button; a model button says `preparing models (k/n)` until the models are ready."""
    if preparing_step and name in NEEDS_MODELS:
        return f"{BUTTON_LABELS[name]} · preparing models ({preparing_step})"
    return BUTTON_LABELS[name]


# --- round cards --------------------------------------------------------------------------------


def round_origin(state: StudioState, index: int) -> str:
    item = state.rounds[index]
    if item.source == "uploaded":
        return "your image"
    if item.source == "generated" or item.base_index is None:
        return "generated"
    return f"from round {item.base_index}"


def round_seconds(state: StudioState, index: int) -> float:
    return sum(state.rounds[index].seconds.values())


def card_title(state: StudioState, index: int) -> str:
    """'Round k · from round j · seed s · t s' (round 0: generated / your image)."""
    item = state.rounds[index]
    return f"Round {index} · {round_origin(state, index)} · seed {item.seed} · {round_seconds(state, index):.1f} s"


def scorer_hover(scorer: str) -> str:
    """What a scorer measures, for the hover of a card's score (`vqascore:<mllm>` as `vqascore`)."""
    return SCORER_HOVERS.get(scorer.split(":")[0], "an alignment score of the image and the prompt; higher is better")


SELF_JUDGED_NOTE = "self-judged"
SELF_JUDGED_HOVER = ("judged by the same MLLM whose guidance made the round (no other judge is available here): "
                     "it grades its own advice")


def card_score(state: StudioState, index: int, scorer: str | None, self_judged: bool = False) -> str:
    """The round's score with the digits that tell this session's rounds apart, its change from round 0,
    a star on the best round (all from the same rounded values), and a hover saying what it measures;
    `self_judged`: the judge is the guidance MLLM, which the card says."""
    if not scorer:
        return ""
    value = state.shown_score(index, scorer)
    if value is None:
        return f"{scorer}: not scored"
    digits = state.score_digits(scorer)
    text = f"{scorer} {value:.{digits}f}"
    first = state.shown_score(0, scorer)
    if index > 0 and first is not None:
        text += f" ({value - first:+.{digits}f} from round 0)"
    if state.best_index(scorer) == index:
        text += " · ★ best round"
    hover = scorer_hover(scorer)
    if self_judged:
        text += f" · {SELF_JUDGED_NOTE}"
        hover += f"; {SELF_JUDGED_HOVER}"
    return f'<span class="round-score" title="{html.escape(hover)}">{text}</span>'


def guidance_source(item: Round, edited: bool) -> str | None:
    """Which guidance a refined round was made with, for its card: 'guided by your edit' when a critique
    the user edited steered it (dialogue guidance), else "MLLM's own reading" (the question, or the
    MLLM's own critique). The round's own record says so (`Round.guidance_source`, kept in the History
    and session.json); for a round without it, `edited`: its critique differed from what the MLLM wrote
    for its base (`StudioState.edited`, which a restored session does not have). None for round 0."""
    if item.source != "refined":
        return None
    if item.guidance_source in GUIDANCE_SOURCES:
        by_edit = item.guidance_source == GUIDED_BY_EDIT
    else:
        by_edit = item.guidance_mode == "dialogue" and edited
    return GUIDED_BY_EDIT_LABEL if by_edit else GUIDED_BY_MLLM


def card_markdown(state: StudioState, index: int, scorer: str | None, self_judged: bool = False) -> str:
    """Title, score, which guidance made it, base marker and the prompt where it differs from round 0's."""
    lines = [f"**{card_title(state, index)}**"]
    score = card_score(state, index, scorer, self_judged)
    if score:
        lines.append(score)
    guidance = guidance_source(state.rounds[index], index in state.edited)
    if guidance:
        lines.append(f"Guidance: {guidance}")
    if index == state.base:
        lines.append("**▶ base of the next round**")
    item = state.rounds[index]
    if index > 0 and item.prompt != state.rounds[0].prompt:
        lines.append(f"Prompt: *{_one_line(item.prompt, CARD_PROMPT_CHARS)}*")
    return "\n\n".join(lines)


def card_critique(state: StudioState, index: int) -> tuple[str, str] | None:
    """(accordion label, text) of the critique a round was made from, or None for round 0."""
    item = state.rounds[index]
    if item.source != "refined":
        return None
    used = "steered this round" if item.guidance_mode == "dialogue" else "shown only; question-mode guidance"
    parts = [f"*Critique ({used}):* {_one_line(item.critique)}" if item.critique else "*No critique text.*"]
    if item.question:
        parts.append(f"*Question:* {_one_line(item.question)}")
    return "Critique it was made from", "\n\n".join(parts)


def base_label(state: StudioState) -> str:
    if state.base is None:
        return "Base of the next round"
    return f"Round {state.base}: base of the next round"


def critique_label(state: StudioState) -> str:
    if state.base is None:
        return "Critique (editable)"
    return f"Critique of round {state.base} (editable)"


def next_round_note(
    state: StudioState, mode: str, question: str | None, critique: str | None, choice: str | None = None
) -> str:
    """What the next Refine will use: the question (question mode), or the critique as edited (dialogue).
    `mode` is the mode the round gets; `choice` the page's setting ("auto": an edit steers)."""
    if state.is_empty:
        return "*The next round's guidance shows here once there is an image.*"
    head = f"**Next round** (from round {state.base}, {mode} mode) uses "
    if mode == "dialogue":
        text = (critique or "").strip()
        if not text:
            return head + "a critique the MLLM writes first (the box is empty)."
        if choice == "auto":
            return head + f"your edited critique, which will steer it: “{_one_line(text, NOTE_CHARS)}”"
        return head + f"the critique as edited: “{_one_line(text, NOTE_CHARS)}”"
    if question:
        return head + f"the question: “{_one_line(question, NOTE_CHARS)}”"
    return head + "the MLLM's question (shown once the models are loaded)."


def queue_line(jobs_ahead: int | None) -> str:
    """The status of a clicked job before it starts: where it stands in the GPU queue."""
    if not jobs_ahead:
        return "Starting…"
    jobs = "1 job" if jobs_ahead == 1 else f"{jobs_ahead} jobs"
    return f"⏳ Waiting in the queue: {jobs} ahead of yours (position {jobs_ahead + 1}). Stop cancels it."


# --- status ---------------------------------------------------------------------------------------


def stage_line(event: StageEvent, load_step: str | None = None, auto: tuple[int, int] | None = None) -> str:
    """One line for a stage event: 'loading models 2/4 · …', 'round 2 · critique', 'round 2 of 4 ·
    regenerating step 31/50'. `auto` = (first round index of an Auto-refine, its number of rounds)."""
    words = STAGE_WORDS[event.stage]
    if event.stage == Stage.STOPPING:
        return words[0].upper() + words[1:] + "…"
    if event.stage == Stage.LOAD:
        return f"{words} {load_step or ''} · {event.message or ''}".replace("  ", " ").strip(" ·")
    if auto is not None:
        first, count = auto
        where = f"round {event.round_index - first + 1} of {count}"
    else:
        where = f"round {event.round_index}"
    line = f"{where} · {words}"
    if event.stage == Stage.SCORE and event.message:
        line += f" ({event.message})"
    if event.step is not None and event.total:
        line += f" step {event.step}/{event.total}"
    return line


# An absolute (or home-relative) file path inside a message: not a URL's path, not part of a word.
_SERVER_PATH = re.compile(r"(?<![\w:/.~-])~?/(?:[^\s/'\"`<>()\[\]]+/)*[^\s/'\"`<>()\[\]]*")


def public_text(text: str) -> str:
    """`text` with every server path cut to its last part (`/tmp/.../gradio/ab12/notes.png` -> `notes.png`,
    a cache folder -> its name): messages a web page shows never reveal the server's layout."""

    def last_part(match: re.Match) -> str:
        parts = [part for part in match.group(0).split("/") if part and part != "~"]
        return parts[-1] if parts else "a server folder"

    return _SERVER_PATH.sub(last_part, text)


def _one_line(text: str, limit: int | None = None) -> str:
    """`text` on one line, HTML-escaped, cut to `limit` characters with an ellipsis."""
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return html.escape(text)
