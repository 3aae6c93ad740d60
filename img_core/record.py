"""What a session makes: `Round` (one image and how it was made) and `SessionRecord` (all rounds of one
prompt), and their files: `session.json` (format `img-session/1`) with round_0.png, round_1.png, ... in a
folder or a zip. The CLI writes them, the app downloads them, `evaluate` reads them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from img_core.errors import InvalidInputError

SESSION_FORMAT = "img-session/1"
# Round fields that are not written to session.json (the image is its own file; features and the kept
# reading are caches).
NOT_RECORDED = ("image", "image_features", "reading")
# Whose reading guided a refined round (`Round.guidance_source`): the MLLM's own (question mode, or dialogue
# over the critique it wrote) or the critique the user typed or edited (dialogue over that text).
GUIDED_BY_MLLM = "MLLM's own reading"
GUIDED_BY_EDIT = "edited critique"
GUIDANCE_SOURCES = (GUIDED_BY_MLLM, GUIDED_BY_EDIT)


@dataclass(frozen=True)
class KeptReading:
    """What Critique read from a round, kept with it: in question mode ONE prefill of the MLLM gives the
    question, the critique and the guidance (`MLLMCritic.read`). A Refine from that round under the same
    `conditions` (MLLM, question source, prompt, seed, critique length) reuses the guidance instead of
    running the MLLM again; `critique` is the text the MLLM wrote, what an edit is told apart from."""

    question: str
    critique: str
    guidance: torch.Tensor  # (1, Sg, Dg) float32 on CPU
    conditions: tuple


@dataclass
class Round:
    """One image of a session and how it was made."""

    index: int
    image: Image.Image
    prompt: str
    seed: int
    source: str  # "generated" | "uploaded" | "refined"
    critique: str | None = None  # the critique this round was re-generated from
    guidance_mode: str | None = None  # how the MLLM computed its guidance: "question" | "dialogue"
    guidance_source: str | None = None  # GUIDANCE_SOURCES: whose text steered it (refined rounds)
    question: str | None = None
    base_index: int | None = None  # the round it was refined from
    settings: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    question_source: str | None = None  # "ours", "release" or the question file used
    scores: dict[str, float] = field(default_factory=dict)  # alignment scores by scorer name
    # Post-projection IP-Adapter tokens of `image` (1, Si, D), kept once computed: refining from this round
    # again does not re-encode it. A cache, not part of the record.
    image_features: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # What `IMGSession.critique` read from this round (see KeptReading). A cache, not part of the record.
    reading: KeptReading | None = field(default=None, repr=False, compare=False)

    @property
    def guided_by_edit(self) -> bool:
        """This round was steered by a critique the user typed or edited (what a card says)."""
        return self.guidance_source == GUIDED_BY_EDIT

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NOT_RECORDED}
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
            "format": SESSION_FORMAT,
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


def check_output_folder(folder: str | Path, argument: str = "the output folder") -> Path:
    """Make sure `folder` can be written (creating it), before any work is done for it.

    Raises InvalidInputError naming `argument` when it is a file or cannot be created or written."""

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"{argument} {folder} is a file, not a folder: give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".img-studio-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InvalidInputError(
            f"{argument} {folder} cannot be written ({error.strerror or error}): choose a folder you can write to"
        ) from error
    return folder
