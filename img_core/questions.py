"""The questions put to the MLLM: "how could this image match the intended prompt?".

The paper asks its fine-tuned LLaVA one of 100 paraphrases of "How can the <image> match the intended
prompt: <prompt>?" (REFERENCE §5). `assets/question_templates.json` holds 100 paraphrases in this
project's own wording, each with one `{prompt}` placeholder. The choice is seeded so a round can be
reproduced: the same seed always asks the same question.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PLACEHOLDER = "{prompt}"
NUM_TEMPLATES = 100
DEFAULT_TEMPLATES_PATH = Path(__file__).resolve().parent.parent / "assets" / "question_templates.json"


def load_question_templates(path: str | Path | None = None) -> list[str]:
    """Read and validate the template list: 100 unique strings, each with exactly one `{prompt}`."""
    path = Path(path) if path is not None else DEFAULT_TEMPLATES_PATH
    templates = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"{path} must hold a JSON list of strings")
    if len(templates) != NUM_TEMPLATES:
        raise ValueError(f"{path} holds {len(templates)} templates, expected {NUM_TEMPLATES}")
    duplicates = sorted({t for t in templates if templates.count(t) > 1})
    if duplicates:
        raise ValueError(f"{path} repeats templates: {duplicates[:3]}")
    malformed = [t for t in templates if t.count(PLACEHOLDER) != 1]
    if malformed:
        raise ValueError(f"templates must contain {PLACEHOLDER} exactly once; offending: {malformed[:3]}")
    return templates


def pick_question(prompt: str, seed: int, templates: list[str] | None = None) -> str:
    """The question for `prompt`: the template drawn by `random.Random(seed)`, with the prompt filled in.

    `str.replace` (not `str.format`) fills the placeholder, so braces in a prompt are kept as typed."""
    templates = templates if templates is not None else load_question_templates()
    template = random.Random(seed).choice(templates)
    return template.replace(PLACEHOLDER, prompt.strip())
