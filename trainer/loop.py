"""The parts of a training loop that `trainer.train` and `trainer.finetune_mllm` share.

* **Checkpoints** are an explicit dict (model, optimizer, config, step, RNG states, ...) saved by
  `save_checkpoint` as RUN/checkpoints/step-NNNNNNNN/checkpoint.pt. Every folder this module writes
  (checkpoints and `final/`) is written atomically: into a hidden temporary folder, each file fsynced, a
  `SHA256SUMS` file (`sha256sum -c` format) listing every file, then renamed into place. `verify_folder`
  checks every listed file on load; a folder without checksums is refused (it cannot be told from a
  damaged one).
* **Resume** (`find_resume_point`): the newest checkpoint that verifies; damaged ones are renamed
  damaged-step-* with a warning. When no intact checkpoint is left, the run refuses this and every later
  `--resume` (and a fresh start into the same folder) until the user passes `--restart`, which moves the
  whole damaged run aside (RUN.damaged-N) and starts over: metrics and `final/` are never overwritten by a
  silent restart from step 0.
* **Skip-safe accumulation** (`accumulation_micro_step`): a micro-batch that must be skipped (unreadable
  input, non-finite loss) still runs one backward, of an exactly-zero loss on finite dummy inputs, so
  accelerate's accumulation phase and DDP's gradient all-reduce stay in step on every process (a process
  that skips the backward leaves the others waiting in the all-reduce).
* **Named counters** (`Tally`): per-step sums that are all-reduced in one call, addressed by name.
* **metrics.jsonl** (`rewind_metrics`): lines after the resumed step are dropped, damaged lines are
  skipped with a warning instead of blocking the resume.
* **Output folders** (`output_folder`): a command that fails leaves no empty --out folder behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from img_core.errors import CorruptFileError
from img_core.integrity import (
    check_finite,
    has_checksums,
    verify_checksum,
    verify_folder,
    write_checksums,
)

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINTS_DIR = "checkpoints"
DAMAGED_PREFIX = "damaged-"


# ----------------------------------------------------------------------------------------- folders


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_save_dir(write: Callable[[Path], object], final: Path) -> None:
    """Call write(tmp_dir), record the sha256 of every file in tmp_dir/SHA256SUMS, fsync, then rename
    tmp_dir to `final` (replacing an older `final`). A crash at any point leaves the old `final` or the
    new one, never a mix."""
    final = Path(final)
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    write_checksums(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(tmp)
    if final.exists():
        old = final.with_name("." + final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)


@contextlib.contextmanager
def output_folder(out: str | Path) -> Iterator[Path]:
    """Yield `out`; when the body raises and `out` did not exist before and is (still) empty, remove it
    (and its empty parents created for it), so a failing command leaves no empty --out folder."""
    out = Path(out)
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    try:
        yield out
    except BaseException:
        for folder in missing:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        raise


# ----------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG a training step may draw from: torch (CPU and CUDA), Python's `random`, numpy."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    return sorted((Path(out) / CHECKPOINTS_DIR).glob("step-*[0-9]"))


def damaged_checkpoint_dirs(out: Path) -> list[Path]:
    return sorted((Path(out) / CHECKPOINTS_DIR).glob(DAMAGED_PREFIX + "step-*[0-9]"))


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints."""
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)


def save_checkpoint(out: Path, state: dict, finite: tuple[str, ...] = ()) -> Path:
    """Write `state` (a dict with at least "step") to OUT/checkpoints/step-NNNNNNNN atomically, after
    checking that the state dicts named in `finite` hold no NaN or inf; returns the folder."""
    folder = Path(out) / CHECKPOINTS_DIR / f"step-{state['step']:08d}"
    for key in finite:
        check_finite(state[key], f"{key} at step {state['step']} (not saved to {folder})")
    atomic_save_dir(lambda tmp: torch.save(state, tmp / CHECKPOINT_NAME), folder)
    return folder


def load_checkpoint(folder: Path, required: tuple[str, ...] = ("step", "config"),
                    finite: tuple[str, ...] = ()) -> dict:
    """The state dict of folder/checkpoint.pt after verifying the folder's SHA256SUMS (an older
    checkpoint with only a checkpoint.pt.sha256 sidecar is verified against that); CorruptFileError
    naming the file and the damage otherwise."""
    folder = Path(folder)
    path = folder / CHECKPOINT_NAME
    if has_checksums(folder) or not verify_checksum(path):  # verify_checksum: False when it has no sidecar
        verify_folder(folder)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch reports damaged zip/pickle data as many error types
        raise CorruptFileError(f"{path} cannot be read ({type(error).__name__}: {error})") from error
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CorruptFileError(f"{path} is not a training checkpoint: it lacks {missing}")
    for key in finite:
        check_finite(checkpoint[key], f"{path} ({key})")
    return checkpoint


def newest_good_checkpoint(out: Path, load: Callable[[Path], dict],
                           log: logging.Logger = logger) -> tuple[Path, dict] | None:
    """The newest checkpoint in OUT/checkpoints that `load` reads intact, or None when the run has none.
    Damaged ones are renamed damaged-step-* (kept for inspection) with a warning. Raises CorruptFileError
    when the run has checkpoints but none is intact (also on every later call: the damaged-step-* folders
    stay until --restart moves the run aside)."""
    for folder in reversed(checkpoint_dirs(out)):
        try:
            return folder, load(folder)
        except CorruptFileError as error:
            log.warning("%s; falling back to the previous checkpoint", error)
            aside = folder.with_name(DAMAGED_PREFIX + folder.name)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
    damaged = damaged_checkpoint_dirs(out)
    if damaged:
        raise CorruptFileError(
            f"every checkpoint in {Path(out) / CHECKPOINTS_DIR} is damaged ({', '.join(p.name for p in damaged)}): "
            "pass --resume with a good checkpoint folder, or --restart to move this run aside and start over"
        )
    return None


def move_run_aside(out: Path) -> Path:
    """Rename the run folder OUT to the first free OUT.damaged-N; returns the new name."""
    out = Path(out)
    for number in range(1, 10_000):
        aside = out.with_name(f"{out.name}.damaged-{number}")
        if not aside.exists():
            os.replace(out, aside)
            return aside
    raise FileExistsError(f"{out}.damaged-1 ... -9999 all exist: clean them up")


def run_has_state(out: Path, metrics_name: str) -> bool:
    """Whether OUT holds a run that a fresh start would overwrite (checkpoints, damaged ones, metrics, final)."""
    out = Path(out)
    return bool(checkpoint_dirs(out) or damaged_checkpoint_dirs(out) or (out / metrics_name).is_file()
                or (out / "final").exists())


def find_resume_point(out: Path, resume: str | None, restart: bool, load: Callable[[Path], dict],
                      is_main_process: bool, wait_for_everyone: Callable[[], None],
                      metrics_name: str, log: logging.Logger = logger) -> tuple[Path, dict] | None:
    """Where a run continues: (checkpoint folder, state) or None to start from step 0.

    `resume` "latest": the newest intact checkpoint in OUT (None when the run has never saved one); a
    folder: that checkpoint. `restart`: move an existing OUT aside first and start over. Neither: start
    over only when OUT holds no earlier run. The main process verifies and renames; the others then read
    what it settled on. Warnings go to `log` (the calling trainer's logger)."""
    out = Path(out)
    if restart:
        if resume:
            raise ValueError("pass either --resume or --restart, not both")
        if is_main_process and out.exists() and any(out.iterdir()):
            log.warning("--restart: moved the earlier run to %s", move_run_aside(out))
        wait_for_everyone()
        return None
    if resume == "latest":
        found, failure = None, None
        if is_main_process:  # verifies, and renames damaged checkpoints aside
            try:
                found = newest_good_checkpoint(out, load, log)
            except CorruptFileError as error:
                failure = error
        wait_for_everyone()
        if failure is not None:
            raise failure
        if not is_main_process:
            found = newest_good_checkpoint(out, load, log)
        if found is None:
            if (out / "final").exists():
                raise ValueError(f"{out} has no checkpoint to resume from but holds a finished run (final/): pass "
                                 "--restart to move it aside and start over, or choose another --out")
            log.info("no checkpoint in %s: starting from scratch", out / CHECKPOINTS_DIR)
        return found
    if resume:
        folder = Path(resume)
        if not (folder / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"--resume {folder} has no {CHECKPOINT_NAME}")
        return folder, load(folder)
    if run_has_state(out, metrics_name):
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, --restart to move it aside and "
                         "start over, or choose another --out")
    return None


# ----------------------------------------------------------------------------------------- metrics


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def rewind_metrics(path: Path, step: int, log: logging.Logger = logger) -> int:
    """Keep the lines of metrics file `path` up to `step` (a killed run may have logged past its last
    checkpoint); damaged lines are dropped with a warning. Returns the number of damaged lines."""
    if not path.is_file():
        return 0
    kept, damaged = [], 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            keep = record["step"] <= step
        except (ValueError, TypeError, KeyError):
            damaged += 1
            log.warning("%s line %d is damaged (%.60r): skipped", path, number, line)
            continue
        if keep:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return damaged


# ----------------------------------------------------------------------------------------- the step


class Tally:
    """Named per-step sums kept in one tensor, so that one all-reduce sums all of them over processes.

        tally = Tally(("used", "skipped_nonfinite"), device)
        tally["used"] += 1
        totals = tally.reduce(accelerator)   # {"used": 2.0, "skipped_nonfinite": 0.0}
    """

    def __init__(self, names: tuple[str, ...], device: torch.device | str):
        self.names = tuple(names)
        self.values = torch.zeros(len(self.names), device=device)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[self.names.index(name)]

    def __setitem__(self, name: str, value) -> None:
        self.values[self.names.index(name)] = value

    def reduce(self, accelerator) -> dict[str, float]:
        totals = accelerator.reduce(self.values.clone(), reduction="sum")
        return dict(zip(self.names, totals.tolist()))

    def checkpoint_state(self, accelerator) -> dict[str, float]:
        """The sums so far over all processes (every process must call it), for a checkpoint, so that
        the first log line after a resume averages the same micro-batches as the uninterrupted run's."""
        return self.reduce(accelerator)

    def restore(self, state: dict[str, float], is_main_process: bool) -> None:
        """Continue from `checkpoint_state`: the main process holds the sums, the others start at zero."""
        self.values.zero_()
        if is_main_process:
            self.values += torch.tensor([state[name] for name in self.names], device=self.values.device)


def accumulation_micro_step(accelerator, model, compute_loss: Callable[[], dict[str, torch.Tensor]] | None,
                            zero_loss: Callable[[], torch.Tensor]) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """One micro-batch inside `accelerator.accumulate(model)`, always with exactly one backward.

    `compute_loss()` returns {"loss": scalar, other statistics...}; it is None when the micro-batch has no
    usable input. Returns (the statistics, detached, None) when the loss was used, or (None, reason) with
    reason "unreadable" or "nonfinite" when the backward was of `zero_loss()` instead: a loss that is
    exactly 0 with all-zero gradients from a forward on finite dummy inputs (a NaN loss times 0 would still
    give NaN gradients). That backward keeps DDP's gradient all-reduce and accelerate's accumulation phase
    in step on every process; a process that skipped it would leave the others waiting in the all-reduce."""
    with accelerator.accumulate(model):
        reason = "unreadable" if compute_loss is None else None
        if compute_loss is not None:
            stats = compute_loss()
            if not torch.isfinite(stats["loss"]):
                reason = "nonfinite"
        if reason is None:
            accelerator.backward(stats["loss"])
            return {name: value.detach() for name, value in stats.items()}, None
        accelerator.backward(zero_loss())
        return None, reason
