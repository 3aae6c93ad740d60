"""Readers for the two training datasets: Pick-a-Pic preference pairs and InstructPix2Pix edit triplets.

A source is a local folder of parquet files (read in file-name order), one parquet file, or a Hugging
Face hub dataset id (needs the `datasets` package). Rows are addressed by their position in the source,
which is what makes extraction shards and training order reproducible. Image columns may hold raw bytes
or the `{"bytes": ..., "path": ...}` structs that `datasets` writes.

    Pick-a-Pic (REFERENCE §6):    caption, jpg_0, jpg_1, label_0, label_1   (label 1 = preferred; ties 0.5/0.5)
    InstructPix2Pix (REFERENCE §5): original_image, edited_prompt, edit_prompt
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

PICK_A_PIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
INSTRUCT_PIX2PIX_COLUMNS = ("original_image", "edited_prompt", "edit_prompt")


class ParquetRows:
    """Random access to the rows of parquet files, reading (and caching) one row group at a time.

    Sequential access is cheap; random access re-reads a row group per row whenever the order jumps."""

    def __init__(self, paths: list[Path], columns: tuple[str, ...]):
        import pyarrow.parquet as pq

        if not paths:
            raise FileNotFoundError("no parquet files given")
        self.paths, self.columns = paths, list(columns)
        self.group_starts: list[tuple[int, int, int]] = []  # (first row, file index, row group)
        total = 0
        for file_index, path in enumerate(paths):
            parquet = pq.ParquetFile(path)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(f"{path} lacks columns {missing}; it has {parquet.schema_arrow.names}")
            for group in range(parquet.metadata.num_row_groups):
                self.group_starts.append((total, file_index, group))
                total += parquet.metadata.row_group(group).num_rows
        self.num_rows = total
        self._firsts = [first for first, _, _ in self.group_starts]
        self._cached: tuple[int, object] | None = None  # (group position, pyarrow table)

    def __len__(self) -> int:
        return self.num_rows

    def column(self, name: str) -> list:
        """One whole (small) column, e.g. the labels, without reading the image columns."""
        import pyarrow.parquet as pq

        return [value for path in self.paths for value in pq.read_table(path, columns=[name]).column(name).to_pylist()]

    def row(self, index: int) -> dict:
        import pyarrow.parquet as pq

        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.num_rows} rows")
        position = bisect.bisect_right(self._firsts, index) - 1
        first, file_index, group = self.group_starts[position]
        if self._cached is None or self._cached[0] != position:
            table = pq.ParquetFile(self.paths[file_index]).read_row_group(group, columns=self.columns)
            self._cached = (position, table)
        table = self._cached[1]
        return {name: table.column(name)[index - first].as_py() for name in self.columns}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": None}


class HubRows:
    """The same interface over a hub dataset loaded with `datasets` (image columns left undecoded)."""

    def __init__(self, dataset_id: str, split: str, columns: tuple[str, ...]):
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                f"{dataset_id!r} is not a local folder or parquet file, and reading a hub dataset needs the "
                "`datasets` package: `pip install datasets`, or download the parquet files and pass their folder"
            ) from error
        dataset = datasets.load_dataset(dataset_id, split=split)
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise ValueError(f"hub dataset {dataset_id} lacks columns {missing}; it has {dataset.column_names}")
        for name in columns:
            if isinstance(dataset.features[name], datasets.Image):
                dataset = dataset.cast_column(name, datasets.Image(decode=False))
        self.dataset, self.columns = dataset.select_columns(list(columns)), list(columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def column(self, name: str) -> list:
        return list(self.dataset[name])

    def row(self, index: int) -> dict:
        return self.dataset[index]


def open_rows(source: str | Path, columns: tuple[str, ...], split: str = "train") -> ParquetRows | HubRows:
    """A folder of parquet files, one parquet file, or else a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("**/*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .parquet files")
        return ParquetRows(files, columns)
    if path.is_file():
        return ParquetRows([path], columns)
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(
            f"dataset {source} is neither an existing folder or parquet file nor a hub id (owner/name)"
        )
    return HubRows(str(source), split, columns)


def image_bytes(value) -> bytes:
    """Encoded image bytes from a raw-bytes cell or a `{"bytes", "path"}` struct cell."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
    raise ValueError(f"cannot read image bytes from a cell of type {type(value).__name__}")


@dataclass
class PreferencePair:
    row: int
    caption: str
    winner: bytes  # encoded image
    loser: bytes
    critique: str | None = None  # the --critique-column cell: a written critique of the loser, if any


class PreferencePairs:
    """Pick-a-Pic rows as (caption, winner, loser[, critique]); `pairs[row]` is None for a tie.
    `critique_column`: also read that column, a written critique of the losing image per row."""

    def __init__(self, source: str | Path, limit: int | None = None, split: str = "train",
                 critique_column: str | None = None):
        self.critique_column = critique_column
        columns = PICK_A_PIC_COLUMNS + ((critique_column,) if critique_column else ())
        self.rows = open_rows(source, columns, split)
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        self.length = len(self.rows) if limit is None else min(limit, len(self.rows))

    def __len__(self) -> int:
        return self.length

    def decided_rows(self) -> list[int]:
        """Rows that are not ties, read from the label columns only."""
        labels = zip(self.rows.column("label_0")[: self.length], self.rows.column("label_1")[: self.length])
        return [row for row, (label_0, label_1) in enumerate(labels) if label_0 != label_1]

    def __getitem__(self, row: int) -> PreferencePair | None:
        if not 0 <= row < self.length:
            raise IndexError(f"row {row} out of range for {self.length} rows")
        values = self.rows.row(row)
        if values["label_0"] == values["label_1"]:
            return None
        first_wins = values["label_0"] > values["label_1"]
        winner, loser = (values["jpg_0"], values["jpg_1"]) if first_wins else (values["jpg_1"], values["jpg_0"])
        critique = values[self.critique_column] if self.critique_column else None
        return PreferencePair(row, values["caption"] or "", image_bytes(winner), image_bytes(loser), critique)


@dataclass
class EditTriplet:
    row: int
    image: bytes  # the original (unedited) image, encoded
    edited_prompt: str  # the prompt the image should match
    edit_prompt: str  # the instruction: the answer the MLLM learns to give


class EditTriplets:
    """InstructPix2Pix rows as (original image, edited prompt, edit instruction)."""

    def __init__(self, source: str | Path, limit: int | None = None, split: str = "train"):
        self.rows = open_rows(source, INSTRUCT_PIX2PIX_COLUMNS, split)
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        self.length = len(self.rows) if limit is None else min(limit, len(self.rows))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, row: int) -> EditTriplet:
        if not 0 <= row < self.length:
            raise IndexError(f"row {row} out of range for {self.length} rows")
        values = self.rows.row(row)
        return EditTriplet(row, image_bytes(values["original_image"]), values["edited_prompt"] or "",
                           values["edit_prompt"] or "")  # fmt: skip
