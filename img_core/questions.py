"""The questions put to the MLLM: "how could this image match the intended prompt?".

A *question source* is a list of templates, each with one `{prompt}` placeholder; one template is drawn
per image and the prompt filled in. Three kinds (REFERENCE §5):

  * "ours"    - `assets/question_templates.json`: 100 paraphrases in this project's own wording. The
                default, and the fallback when the release's list cannot be had.
  * "release" - the release's `assets/edit_instructions.json` (100 entries, 97 distinct), the questions the
                released LLaVA and aligners were trained with. Its text is not part of this repository: it
                is fetched once over HTTPS from the release at its pinned commit and cached under
                `$IMG_STUDIO_CACHE` (default `~/.cache/img-studio`). Offline and not cached: "ours", with
                one warning saying how to get the file.
  * a path    - a JSON file in the release's format (a list of strings with `{prompt}`), e.g. a local copy
                of the release's file.

The release draws with an unseeded `random.choice`; we draw with `random.Random(seed)` so that a round can
be reproduced (same seed, same question), over the list as it is (repeated entries keep their weight).
The release fills the placeholder with a plain `str.replace`; "release" and file sources do the same.
Our own templates additionally avoid doubled punctuation ("...a brown horse.?", see `fill_ours`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from img_core.errors import InvalidInputError
from img_core.paths import ASSETS_DIR, cache_root

logger = logging.getLogger(__name__)

PLACEHOLDER = "{prompt}"
NUM_TEMPLATES = 100  # our own list
DEFAULT_TEMPLATES_PATH = ASSETS_DIR / "question_templates.json"

OURS = "ours"
RELEASE = "release"
QUESTION_SOURCES = (OURS, RELEASE)  # the named sources; any other spec is a path to a JSON file
DEFAULT_QUESTION_SOURCE = OURS

RELEASE_REPO = "SHI-Labs/IMG-Multimodal-Diffusion-Alignment"
RELEASE_COMMIT = "3b7abddb533e4e15edd519ae9318c6fb760ff478"
RELEASE_QUESTIONS_PATH = "assets/edit_instructions.json"
RELEASE_QUESTIONS_URL = f"https://raw.githubusercontent.com/{RELEASE_REPO}/{RELEASE_COMMIT}/{RELEASE_QUESTIONS_PATH}"
RELEASE_QUESTIONS_SHA256 = "de82949d760fb233c23e26e50d52aa36f45b658d0b662c281783377091b43902"  # of the file at that commit
FETCH_TIMEOUT_S = 10.0
MAX_QUESTIONS_FILE_BYTES = 1_000_000  # the release's file is ~7 kB; anything far bigger is not it

SENTENCE_END = (".", "!", "?")
PUNCTUATION = (".", "!", "?", ",", ";", ":")


def release_questions_cache_path(cache_dir: Path | None = None) -> Path:
    """Where the fetched release questions are kept (named by the pinned commit)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    return cache_dir / "questions" / f"edit_instructions-{RELEASE_COMMIT[:7]}.json"


# ------------------------------------------------------------------------------------------ filling


def fill_exact(template: str, prompt: str) -> str:
    """The release's rule: `template.replace("{prompt}", prompt)`, the prompt as given."""
    return template.replace(PLACEHOLDER, prompt)


def fill_ours(template: str, prompt: str) -> str:
    """Our templates' rule: the stripped prompt, without its final . ! ? marks when the template puts a
    punctuation mark right after the placeholder ("a brown horse." + "{prompt}?" -> "a brown horse?").

    `str.replace` (not `str.format`) fills the placeholder, so braces in a prompt are kept as typed."""
    prompt = prompt.strip()
    after = template.split(PLACEHOLDER, 1)[1] if PLACEHOLDER in template else ""
    if after.startswith(PUNCTUATION) and prompt.endswith(SENTENCE_END):
        prompt = prompt.rstrip("".join(SENTENCE_END)).rstrip() or prompt
    return template.replace(PLACEHOLDER, prompt)


@dataclass(frozen=True)
class QuestionSource:
    """A named list of question templates and how a prompt is filled into them.

    name: "ours", "release" or the file path given; origin: where the templates were read from (a file or
    the cache of the release's URL), for the session record."""

    name: str
    templates: tuple[str, ...]
    origin: str
    exact_fill: bool = True  # False only for our own templates (punctuation rule of `fill_ours`)

    def pick(self, prompt: str, seed: int) -> str:
        """The question for `prompt`: the template drawn by `random.Random(seed)`, prompt filled in."""
        template = random.Random(seed).choice(self.templates)
        return self.fill(template, prompt)

    def fill(self, template: str, prompt: str) -> str:
        return fill_exact(template, prompt) if self.exact_fill else fill_ours(template, prompt)


# ------------------------------------------------------------------------------------------ validation


def validate_templates(templates: object, where: str) -> tuple[str, ...]:
    """A non-empty JSON list of strings, each with `{prompt}` exactly once; else InvalidInputError naming
    `where` (a file or URL) and what is wrong."""
    hint = (
        f"it must be a JSON list of strings, each containing {PLACEHOLDER} exactly once "
        f'(e.g. ["How can the image show {PLACEHOLDER}?"])'
    )
    if not isinstance(templates, list):
        raise InvalidInputError(f"question file {where} holds a JSON {type(templates).__name__}, not a list: {hint}")
    if not templates:
        raise InvalidInputError(f"question file {where} holds an empty list: {hint}")
    not_strings = [i for i, t in enumerate(templates) if not isinstance(t, str)]
    if not_strings:
        raise InvalidInputError(f"question file {where}: entries {not_strings[:5]} are not strings: {hint}")
    malformed = [i for i, t in enumerate(templates) if t.count(PLACEHOLDER) != 1]
    if malformed:
        raise InvalidInputError(
            f"question file {where}: entries {malformed[:5]} (e.g. {templates[malformed[0]][:80]!r}) do not contain "
            f"{PLACEHOLDER} exactly once: {hint}"
        )
    return tuple(templates)


def _parse_templates(raw: bytes, where: str) -> tuple[str, ...]:
    try:
        templates = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(
            f"question file {where} is not valid UTF-8 JSON ({error}): pass a JSON list of strings"
        ) from error
    return validate_templates(templates, where)


def read_question_file(path: str | Path) -> tuple[str, ...]:
    """Templates of a JSON file in the release's format; InvalidInputError naming the file when unusable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInputError(
            f"question file {path} does not exist: pass one of {', '.join(QUESTION_SOURCES)} or a JSON file "
            f"holding a list of strings with {PLACEHOLDER}"
        )
    if path.stat().st_size > MAX_QUESTIONS_FILE_BYTES:
        raise InvalidInputError(
            f"question file {path} is {path.stat().st_size} bytes, more than {MAX_QUESTIONS_FILE_BYTES}: "
            "is it the right file?"
        )
    return _parse_templates(path.read_bytes(), str(path))


def load_question_templates(path: str | Path | None = None) -> list[str]:
    """Our own list (or a file in its format): 100 unique strings, each with exactly one `{prompt}`."""
    path = Path(path) if path is not None else DEFAULT_TEMPLATES_PATH
    templates = list(read_question_file(path))
    if len(templates) != NUM_TEMPLATES:
        raise InvalidInputError(f"question file {path} holds {len(templates)} templates, expected {NUM_TEMPLATES}")
    duplicates = sorted({t for t in templates if templates.count(t) > 1})
    if duplicates:
        raise InvalidInputError(f"question file {path} repeats templates: {duplicates[:3]}")
    return templates


def pick_question(prompt: str, seed: int, templates: list[str] | None = None) -> str:
    """The question from our own templates (or `templates`, filled by our rule) for this seed."""
    templates = templates if templates is not None else load_question_templates()
    return fill_ours(random.Random(seed).choice(templates), prompt)


# ------------------------------------------------------------------------------------------ sources


def ours_question_source() -> QuestionSource:
    return QuestionSource(OURS, tuple(load_question_templates()), str(DEFAULT_TEMPLATES_PATH), exact_fill=False)


def fetch_release_questions(
    cache_path: Path, url: str = RELEASE_QUESTIONS_URL, sha256: str | None = RELEASE_QUESTIONS_SHA256,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> tuple[str, ...]:
    """Download the release's question file once, check it (sha256 of the pinned file, format) and write it
    atomically to `cache_path`. Raises OSError (offline, HTTP error, timeout, wrong content)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        raw = response.read(MAX_QUESTIONS_FILE_BYTES + 1)
    if len(raw) > MAX_QUESTIONS_FILE_BYTES:
        raise OSError(f"{url} sent more than {MAX_QUESTIONS_FILE_BYTES} bytes")
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256:
        raise OSError(f"{url} sent content with sha256 {digest[:12]}..., not the pinned file's {sha256[:12]}...")
    try:
        templates = _parse_templates(raw, url)
    except InvalidInputError as error:
        raise OSError(str(error)) from error
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_path.parent, suffix=".tmp", delete=False) as handle:
            handle.write(raw)
        os.replace(handle.name, cache_path)
        logger.info("fetched the release's questions from %s into %s", url, cache_path)
    except OSError as error:  # a read-only cache costs a fetch per process, not the questions
        logger.warning("fetched the release's questions but could not cache them at %s (%s)", cache_path, error)
    return templates


_failed_fetches: set[tuple[str, str]] = set()  # (url, cache path) that failed in this process: warned once


def release_question_source(
    cache_dir: Path | None = None, url: str = RELEASE_QUESTIONS_URL, timeout_s: float = FETCH_TIMEOUT_S
) -> QuestionSource:
    """The release's questions from the cache, else fetched once; offline: ours, with ONE warning per process.

    A damaged cached file raises InvalidInputError (it is never used silently)."""
    cache_path = release_questions_cache_path(cache_dir)
    if cache_path.is_file():
        try:
            return QuestionSource(RELEASE, read_question_file(cache_path), str(cache_path))
        except InvalidInputError as error:
            raise InvalidInputError(f"{error}. Delete {cache_path} to fetch it again.") from error
    key = (url, str(cache_path))
    if key not in _failed_fetches:
        try:
            return QuestionSource(RELEASE, fetch_release_questions(cache_path, url, timeout_s=timeout_s), str(cache_path))
        except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, timeouts are OSErrors
            _failed_fetches.add(key)
            logger.warning(
                "question source 'release': could not fetch %s (%s); using this project's own questions instead. "
                "To ask the release's questions, download that file on a machine with internet and pass "
                "--questions FILE, or copy it to %s.",
                url, str(error).splitlines()[0] if str(error) else type(error).__name__, cache_path,
            )
    return ours_question_source()


def load_question_source(
    spec: str | Path | None = None, cache_dir: Path | None = None, release_url: str = RELEASE_QUESTIONS_URL
) -> QuestionSource:
    """"ours" (default), "release" (cached fetch, falling back to ours) or a path to a JSON question file.

    `cache_dir` defaults to `cache_root()`; `release_url` may point at a mirror of the same file."""
    spec = DEFAULT_QUESTION_SOURCE if spec is None or str(spec).strip() == "" else str(spec).strip()
    if spec == OURS:
        return ours_question_source()
    if spec == RELEASE:
        return release_question_source(cache_dir, release_url)
    path = Path(spec).expanduser()
    return QuestionSource(str(spec), read_question_file(path), str(path.resolve()))
