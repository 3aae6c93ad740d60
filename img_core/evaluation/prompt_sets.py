"""Prompt sets for `evaluate`: a list of prompts from a file or a hub dataset.

    load_prompt_set("assets/prompts/compositional.txt")              # .txt: one prompt per line
    load_prompt_set("hpd_test.json")                                  # .json: a list of strings (or of objects)
    load_prompt_set("PartiPrompts.tsv", column="Prompt")              # .csv / .tsv / .parquet: a column
    load_prompt_set("yuvalkirstain/pickapic_v1", column="caption", split="test_unique")   # hub dataset id

Text files: blank lines are skipped, and lines starting with `#` are comments, except
`# category: NAME`, which puts the prompts below it in category NAME (`PromptSet.categories`).
Every source gives a `PromptSet`: the prompts in file order (duplicates kept, so indices stay stable)
and a sha256 over them that identifies the set in an evaluation folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from img_core.errors import InvalidInputError
from img_core.paths import ASSETS_DIR

DEFAULT_PROMPT_COLUMN = "prompt"
DEFAULT_DATASET_SPLIT = "test"
CATEGORY_MARKER = "# category:"
COMPOSITIONAL_PROMPTS = ASSETS_DIR / "prompts" / "compositional.txt"
FILE_SUFFIXES = (".txt", ".json", ".csv", ".tsv", ".parquet")


class PromptSetError(InvalidInputError):
    """A prompt set that cannot be read or holds no usable prompts."""


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    source: str
    categories: list[str | None]  # one per prompt; None where the source has no categories

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()


def load_prompt_set(source: str | Path, column: str | None = None, split: str | None = None) -> PromptSet:
    """The prompts of a .txt/.json/.csv/.tsv/.parquet file or of a hub dataset (`column`, `split`)."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            prompts, categories = _read_text(path)
        elif suffix == ".json":
            prompts, categories = _read_json(path, column), None
        elif suffix in (".csv", ".tsv"):
            prompts, categories = _read_delimited(path, column or DEFAULT_PROMPT_COLUMN, suffix), None
        elif suffix == ".parquet":
            prompts, categories = _read_parquet(path, column or DEFAULT_PROMPT_COLUMN), None
        else:
            raise PromptSetError(f"{path}: prompt files must end in one of {', '.join(FILE_SUFFIXES)}")
    elif path.suffix.lower() in FILE_SUFFIXES or path.exists() or str(source).count("/") != 1:
        raise PromptSetError(f"prompt set {str(source)!r} is no file here (nor a hub dataset id owner/name)")
    else:
        prompts, categories = _read_dataset(str(source), column or DEFAULT_PROMPT_COLUMN, split or DEFAULT_DATASET_SPLIT), None
    prompts = [_checked_prompt(prompt, str(source), index) for index, prompt in enumerate(prompts)]
    if not prompts:
        raise PromptSetError(f"prompt set {str(source)!r} holds no prompts")
    return PromptSet(prompts, str(source), categories or [None] * len(prompts))


def _checked_prompt(prompt, source: str, index: int) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptSetError(f"{source}: prompt {index} is not a non-empty string ({prompt!r})")
    return " ".join(prompt.split())  # one line: newlines or tabs inside a prompt would break the records


def _read_text(path: Path) -> tuple[list[str], list[str | None]]:
    prompts, categories, category = [], [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.lower().startswith(CATEGORY_MARKER):
            category = line[len(CATEGORY_MARKER):].strip() or None
        elif line and not line.startswith("#"):
            prompts.append(line)
            categories.append(category)
    return prompts, categories


def _read_json(path: Path, column: str | None) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PromptSetError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, list):
        raise PromptSetError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
    key = column or DEFAULT_PROMPT_COLUMN
    return [item.get(key) if isinstance(item, dict) else item for item in data]


def _read_delimited(path: Path, column: str, suffix: str) -> list:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter="\t" if suffix == ".tsv" else ",")
        if column not in (reader.fieldnames or []):
            raise PromptSetError(f"{path} has no column {column!r} (columns: {reader.fieldnames}); use --prompt-column")
        return [row[column] for row in reader]


def _read_parquet(path: Path, column: str) -> list:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if column not in names:
        raise PromptSetError(f"{path} has no column {column!r} (columns: {names}); use --prompt-column")
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _read_dataset(dataset_id: str, column: str, split: str) -> list:
    try:
        import datasets
    except ImportError as error:
        raise PromptSetError(f"reading the hub dataset {dataset_id!r} needs the `datasets` package: pip install datasets") from error
    try:
        table = datasets.load_dataset(dataset_id, split=split)
    except Exception as error:  # noqa: BLE001 - offline, missing, gated, bad split: all mean "cannot read it here"
        raise PromptSetError(
            f"hub dataset {dataset_id!r} (split {split!r}) could not be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}). On a machine with internet run "
            f"`hf download {dataset_id} --repo-type dataset` and copy the Hugging Face cache (HF_HOME) here, or "
            "export the prompts to a .txt/.csv/.parquet file and pass that"
        ) from error
    if column not in table.column_names:
        raise PromptSetError(f"dataset {dataset_id!r} has no column {column!r} (columns: {table.column_names}); "
                             "use --prompt-column")
    return list(table[column])
