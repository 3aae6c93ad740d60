"""The on-disk format of a converted MLLM folder, read and written in one place.

A conversion (`weights.convert_llava`, driven by `weights.prepare`) writes into a partial folder next to its
target (`.<name>.partial`, holding a `conversion-progress.json` journal), then renames it into place. A
finished folder holds the conversion record (`img_studio_mllm.json`, see `mllm.specs`) and, written last,
the completion marker `img_studio_complete.json` listing every file with its size. The MLLM loader
(`mllm.critic`) refuses a folder whose marker is missing or whose files differ from it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from img_core.errors import WeightsNotFoundError
from img_core.mllm.specs import CONVERSION_RECORD, KNOWN_MLLMS
from img_core.paths import cache_root

logger = logging.getLogger(__name__)

COMPLETION_MARKER = "img_studio_complete.json"  # written last into a converted folder: its files and sizes
PARTIAL_SUFFIX = ".partial"  # the temporary folder next to the output: `.<output name>.partial`
JOURNAL = "conversion-progress.json"  # inside the partial folder: settings and the source shards done
CONVERTED_MLLMS = ("img-llava-13b",)  # known MLLMs that exist only as a conversion in the cache


def prepared_folder(mllm_name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the converted copy of a release MLLM lives (`<cache>/img-llava-13b-hf`)."""
    return cache_root(cache_dir) / Path(KNOWN_MLLMS[mllm_name].model_id).name


def partial_folder(output_dir: Path) -> Path:
    """The temporary folder a conversion into `output_dir` writes to (next to it, same file system)."""
    output_dir = Path(output_dir)
    return output_dir.with_name(f".{output_dir.name}{PARTIAL_SUFFIX}")


def write_completion_marker(folder: Path) -> None:
    """Record every file of `folder` with its size; written last, it says the folder is complete."""
    folder = Path(folder)
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in (COMPLETION_MARKER, JOURNAL)  # the journal goes right after
    }
    temporary = folder / (COMPLETION_MARKER + ".tmp")
    temporary.write_text(json.dumps({"files": files}, indent=2) + "\n")
    os.replace(temporary, folder / COMPLETION_MARKER)


def is_prepared(folder: str | Path) -> bool:
    """True when `folder` holds a complete converted model (marker present, every file at its size)."""
    if not Path(folder).expanduser().is_dir():
        return False
    try:
        check_prepared_folder(folder, is_conversion=True)
    except WeightsNotFoundError:
        return False
    return True


def check_prepared_folder(folder: str | Path, is_conversion: bool | None = None) -> None:
    """Raise WeightsNotFoundError when `folder` is a conversion output that is not complete.

    The MLLM loader calls this for local folders. A folder needs the completion marker when it is a
    conversion output (it has `img_studio_mllm.json`, a conversion journal, or the `.partial` name) or a
    prepared target in the cache; other folders (hub downloads, tiny test models) pass. A folder from an
    earlier converter (record written last, no marker) passes when every shard in its index exists.
    `is_conversion` forces the decision whether `folder` is a conversion output."""
    folder = Path(folder).expanduser()
    marker = folder / COMPLETION_MARKER
    if is_conversion is None:
        targets = {prepared_folder(name).resolve() for name in CONVERTED_MLLMS}
        is_conversion = (
            (folder / CONVERSION_RECORD).is_file()
            or (folder / JOURNAL).is_file()
            or folder.name.endswith(PARTIAL_SUFFIX)
            or folder.resolve() in targets
        )
    if not is_conversion and not marker.is_file():
        return
    how = "run `python -m img_core prepare --preset sdxl` (or convert-llava) again to finish or redo it"
    if not marker.is_file():
        if _complete_without_marker(folder):
            logger.info("%s has no completion marker but a complete index (earlier converter)", folder)
            return
        raise WeightsNotFoundError(f"{folder} is an incomplete conversion (no {COMPLETION_MARKER}): {how}")
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        raise WeightsNotFoundError(f"{marker} is unreadable ({error}): {how}") from error
    for name, size in listed.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            state = "missing" if not path.is_file() else f"{path.stat().st_size} bytes instead of {size}"
            raise WeightsNotFoundError(f"{folder} is damaged: {name} is {state}. Delete the folder and {how}")


def _complete_without_marker(folder: Path) -> bool:
    """A folder the earlier (single-pass) converter finished: record present, every indexed shard there."""
    if not (folder / CONVERSION_RECORD).is_file() or (folder / JOURNAL).exists():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / shard).is_file() for shard in shards)
    return (folder / "model.safetensors").is_file()


