"""Integrity checks for files the project writes and reads back: sha256 checksums (as `NAME.sha256`
sidecar files in `sha256sum` format, or as manifest entries) and finiteness of stored tensors.

Damaged or non-finite data is refused with a CorruptFileError that names the file and what is wrong,
never used silently.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from img_core.errors import CorruptFileError

CHECKSUM_SUFFIX = ".sha256"
_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: str | Path) -> str:
    """Write `path`.sha256 (atomically) next to `path`; returns the digest."""
    path = Path(path)
    digest = sha256_file(path)
    sidecar = checksum_path(path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, sidecar)
    return digest


def verify_checksum(path: str | Path, expected: str | None = None) -> bool:
    """Check `path` against `expected` (default: its .sha256 sidecar). Returns False when there is no
    checksum to compare with (a file written before checksums existed); raises CorruptFileError when
    the file is missing, empty or its bytes differ."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path} is empty (0 bytes)")
    if expected is None:
        sidecar = checksum_path(path)
        if not sidecar.is_file():
            return False
        expected = sidecar.read_text().split(maxsplit=1)[0] if sidecar.read_text().strip() else ""
    actual = sha256_file(path)
    if actual != expected:
        raise CorruptFileError(
            f"{path} is damaged: its sha256 is {actual[:16]}..., the recorded one is {expected[:16] or '(empty)'}..."
        )
    return True


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [
        name for name, tensor in tensors.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CorruptFileError naming `source` and the tensors that hold NaN or infinity."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CorruptFileError(
            f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}; it cannot be used: retrain it or use another file"
        )


def load_state_dict_file(path: str | Path, what: str, error: type[Exception] = CorruptFileError) -> dict:
    """A plain torch state dict from `path` (a released `.pth`), read with `weights_only=True` (never plain
    pickle). A file that is not a state dict raises `error` naming the file and `what` it should hold."""
    path = Path(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as cause:  # noqa: BLE001 - any unpickling problem means "not a state dict"
        raise error(f"{path} is not a torch state dict of {what}: {cause}") from cause
    if not isinstance(state_dict, dict):
        raise error(f"{path} holds a {type(state_dict).__name__}, not a state dict of {what}")
    return state_dict


# ------------------------------------------------------------------ folders with a SHA256SUMS (trainer output)

CHECKSUMS_NAME = "SHA256SUMS"  # `sha256sum -c` format: one "<sha256>  <relative path>" line per file


def write_checksums(folder: Path) -> None:
    """Write folder/SHA256SUMS with the sha256 of every other file below `folder`."""
    lines = [f"{sha256_file(path)}  {path.relative_to(folder).as_posix()}\n"
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != CHECKSUMS_NAME]
    (folder / CHECKSUMS_NAME).write_text("".join(lines))


def has_checksums(folder: Path) -> bool:
    return (Path(folder) / CHECKSUMS_NAME).is_file()


def verify_folder(folder: str | Path) -> None:
    """Check every file listed in folder/SHA256SUMS; CorruptFileError naming the file otherwise (also when
    the folder has no SHA256SUMS, or it lists nothing)."""
    folder = Path(folder)
    sums = folder / CHECKSUMS_NAME
    if not sums.is_file():
        raise CorruptFileError(f"{folder} has no {CHECKSUMS_NAME}: it cannot be verified (written by an older "
                               "trainer, or an interrupted copy)")
    entries = [line.split(maxsplit=1) for line in sums.read_text(errors="replace").splitlines() if line.strip()]
    if not entries or any(len(entry) != 2 for entry in entries):
        raise CorruptFileError(f"{sums} is damaged: it does not list `sha256  file` lines")
    for expected, name in entries:
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CorruptFileError(f"{sums} is damaged: it lists {name!r:.60}")
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing")
        if path.stat().st_size == 0:
            raise CorruptFileError(f"{path} is empty (0 bytes)")
        actual = sha256_file(path)
        if actual != expected:
            raise CorruptFileError(f"{path} is damaged: its sha256 is {actual[:16]}..., the recorded one is "
                                   f"{expected[:16]}...")
