"""Prompt sets for `evaluate`: a list of prompts from a file, a folder, a named recipe or a hub dataset.

    load_prompt_set("assets/prompts/compositional.txt")              # .txt: one prompt per line
    load_prompt_set("hpd/benchmark")                                  # a folder of .json lists: HPD v2
    load_prompt_set("evaluation_metadata.jsonl")                      # .jsonl: GenEval (`prompt`, `tag`)
    load_prompt_set("drawbench.csv")                                  # .csv / .tsv / .parquet: a column
    load_prompt_set("pickapic-test")                                  # a named recipe (PROMPT_SET_RECIPES)
    load_prompt_set("nateraw/parti-prompts", column="Prompt", split="train")   # any hub dataset id

Text files: blank lines are skipped, and lines starting with `#` are comments, except
`# category: NAME`, which puts the prompts below it in category NAME (`PromptSet.categories`).
Tables (.csv/.tsv/.parquet/.jsonl/.json objects/datasets) take their prompt from `column`, else from the
first of PROMPT_COLUMNS they have, and their category from the first of CATEGORY_COLUMNS they have
(PartiPrompts' and DrawBench's `Category`, GenEval's `tag`). A folder holds .json lists, one per
category named by the file (HPD v2's `benchmark/` folder: anime, concept-art, paintings and photo with 800
prompts each and drawbench with 200: the paper's 3,400 prompts in five lists), read in name order.
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
PROMPT_COLUMNS = ("prompt", "Prompt", "Prompts", "caption")  # tried in order when no column is given
CATEGORY_COLUMNS = ("category", "Category", "tag")
DEFAULT_DATASET_SPLIT = "test"
CATEGORY_MARKER = "# category:"
COMPOSITIONAL_PROMPTS = ASSETS_DIR / "prompts" / "compositional.txt"
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class DatasetRecipe:
    """A hub dataset's prompts: which dataset, column and split (read with `datasets`, captions only)."""

    dataset: str
    column: str
    split: str
    what: str


PROMPT_SET_RECIPES = {
    # the captions-only copy of Pick-a-Pic v1 (150 kB), not yuvalkirstain/pickapic_v1 (every split's images)
    "pickapic-test": DatasetRecipe("yuvalkirstain/pickapic_v1_no_images", "caption", "test_unique",
                                   "Pick-a-Pic v1 test_unique: 500 captions (PickScore's test set)"),
    "parti": DatasetRecipe("nateraw/parti-prompts", "Prompt", "train", "PartiPrompts: 1,632 prompts, 12 categories"),
    "drawbench": DatasetRecipe("sayakpaul/drawbench", "Prompts", "train", "DrawBench: 200 prompts, 11 categories"),
}


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
    """The prompts of a .txt/.json/.jsonl/.csv/.tsv/.parquet file, a folder of .json lists, a named recipe
    (PROMPT_SET_RECIPES) or a hub dataset (`column`, `split`)."""
    path = Path(source).expanduser()
    categories = None
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            prompts, categories = _read_text(path)
        elif suffix == ".json":
            prompts, categories = _from_records(_read_json(path), column, str(path))
        elif suffix == ".jsonl":
            prompts, categories = _from_records(_read_jsonl(path), column, str(path))
        elif suffix in (".csv", ".tsv"):
            prompts, categories = _from_records(_read_delimited(path, suffix), column, str(path))
        elif suffix == ".parquet":
            prompts, categories = _from_records(_read_parquet(path), column, str(path))
        else:
            raise PromptSetError(f"{path}: prompt files must end in one of {', '.join(FILE_SUFFIXES)}")
    elif path.is_dir():
        prompts, categories = _read_folder(path)
    elif str(source) in PROMPT_SET_RECIPES:
        recipe = PROMPT_SET_RECIPES[str(source)]
        prompts, categories = _from_records(_read_dataset(recipe.dataset, split or recipe.split),
                                            column or recipe.column, recipe.dataset)
    elif path.suffix.lower() in FILE_SUFFIXES or path.exists() or str(source).count("/") != 1:
        raise PromptSetError(f"prompt set {str(source)!r} is no file or folder here, nor a recipe "
                             f"({', '.join(PROMPT_SET_RECIPES)}) nor a hub dataset id owner/name")
    else:
        prompts, categories = _from_records(_read_dataset(str(source), split or DEFAULT_DATASET_SPLIT), column,
                                            str(source))
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


def _read_json(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PromptSetError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, list):
        raise PromptSetError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise PromptSetError(f"{path} line {number} is not valid JSON: {error}") from error
    return records


def _from_records(records: list, column: str | None, where: str) -> tuple[list, list[str | None] | None]:
    """Prompts (and categories) from a list of strings or of objects (rows of a table)."""
    objects = [record for record in records if isinstance(record, dict)]
    if not objects:
        return records, None
    if len(objects) < len(records):
        raise PromptSetError(f"{where}: mixes prompt strings and objects")
    names = list(objects[0])
    if column is None:
        column = next((name for name in PROMPT_COLUMNS if name in names), DEFAULT_PROMPT_COLUMN)
    if column not in names:
        raise PromptSetError(f"{where} has no column {column!r} (columns: {names}); use --prompt-column")
    category = next((name for name in CATEGORY_COLUMNS if name in names), None)
    categories = [None if category is None or record.get(category) is None else str(record[category])
                  for record in objects]
    return [record.get(column) for record in objects], categories


def _read_folder(path: Path) -> tuple[list, list[str | None]]:
    """Every .json list in the folder (name order), each file a category named by its stem."""
    files = sorted(path.glob("*.json"))
    if not files:
        raise PromptSetError(f"{path} is a folder with no .json prompt lists in it")
    prompts, categories = [], []
    for file in files:
        listed, _ = _from_records(_read_json(file), None, str(file))
        prompts += listed
        categories += [file.stem] * len(listed)
    return prompts, categories


def _read_delimited(path: Path, suffix: str) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file, delimiter="\t" if suffix == ".tsv" else ","))


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_dataset(dataset_id: str, split: str) -> list[dict]:
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
    return table.to_list()
