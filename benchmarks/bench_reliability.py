"""Reliability figures: what happens to damaged or hostile inputs.

    python benchmarks/bench_reliability.py                       # every section (CPU, about a minute)
    python benchmarks/bench_reliability.py --sections images     # one or more sections by name

Sections (one function each, returning table rows):
  checkpoints  training checkpoints with flipped bytes, truncated, empty, non-finite weights:
               detected? fell back to the newest good one? refused with a clear error when none is good?
  store        feature-store shards (flipped, truncated, empty, missing), manifests (shards null, a list,
               truncated JSON), a NaN sample and an all-NaN store: refused / skipped / stopped, and never
               a non-finite aligner saved
  images       header bombs (PNG, JPEG, GIF declaring huge canvases), folders, non-images: refused
               cleanly (InvalidInputError, no other exception, no PIL warning), time per refusal, and the
               peak RSS of a fresh process refusing a 20000x20000 PNG bomb

A row's `ok` says whether the outcome is the wanted one; the script exits 1 if any row is not ok. To add a
section (e.g. the app/API one: bad inputs tried / refused cleanly / tracebacks / server deaths, RSS and
temp-file growth per 100 calls), write `def bench_<name>(work: Path) -> list[Row]` and add it to SECTIONS.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from img_core.errors import CorruptFileError, IMGError, InvalidInputError  # noqa: E402
from img_core.images import MAX_MEGAPIXELS, load_image  # noqa: E402
from img_core.integrity import write_checksum  # noqa: E402
from trainer.store import shard_name, write_manifest, write_synthetic_store  # noqa: E402
from trainer.train import TrainConfig, checkpoint_dirs, load_checkpoint, split_indices, train  # noqa: E402

TINY_RUN = {"depth": 2, "heads": 2, "dim_head": 16, "lr": 3e-3, "batch_size": 8, "val_samples": 8,
            "val_every": 1000, "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 3, "max_steps": 6}
DAMAGES = ("flipped", "truncated", "empty")
BOMB_SIDE = 20_000  # the 20000x20000 PNG


@dataclass
class Row:
    section: str
    case: str
    expected: str
    observed: str
    ok: bool
    detail: str = ""


# ----------------------------------------------------------------------------------------- helpers


class WarningLog(logging.Handler):
    """Collects the warnings the trainer logs while a case runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "flipped":  # 4 KiB of inverted bytes in the middle
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :])
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        path.unlink()


def outcome_of(action) -> tuple[str, str]:
    """Run action(); return ("ok", result) or (error class name, message) for an exception."""
    try:
        return "ok", str(action())
    except Exception as error:  # noqa: BLE001 - the benchmark reports every kind of failure
        return type(error).__name__, str(error)


def short(text: str, length: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 3] + "..."


def poison_samples(store: Path, indices: list[int], value: float = float("nan")) -> None:
    """Write `value` into stored samples (bypassing write_shard, which refuses it) and re-describe the
    store, as a store damaged upstream of the checksums would be."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest = json.loads((store / "manifest.json").read_text())
    offset = 0
    for name, size in zip(manifest["shards"], manifest["shard_sizes"]):
        rows = [i - offset for i in indices if offset <= i < offset + size]
        if rows:
            with safe_open(str(store / name), framework="pt") as handle:
                tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
            tensors["image_l"][rows, 0, 0] = value
            save_file(tensors, str(store / name), metadata=metadata)
        offset += size
    write_manifest(store, manifest)


# ----------------------------------------------------------------------------------------- checkpoints


def bench_checkpoints(work: Path) -> list[Row]:
    store = work / "store"
    write_synthetic_store(store, 64, shard_size=32, seed=1)
    rows = []
    for kind in (*DAMAGES, "non-finite"):
        run = work / f"run-{kind}"
        train(TrainConfig(features=str(store), out=str(run), **TINY_RUN))  # checkpoints at steps 2, 4, 6
        newest = run / "checkpoints" / "step-00000006" / "checkpoint.pt"
        if kind == "non-finite":  # NaN weights with a matching checksum: only the finiteness check sees it
            state = torch.load(newest, weights_only=True)
            state["aligner"]["zero_linear.bias"][0] = float("nan")
            torch.save(state, newest)
            write_checksum(newest)
        else:
            damage(newest, kind)

        status, message = outcome_of(lambda: load_checkpoint(newest.parent))
        rows.append(Row("checkpoints", f"{kind}: load step 6", "refused", status,
                        status == CorruptFileError.__name__, message))
        log = WarningLog()
        logging.getLogger("trainer.train").addHandler(log)
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(run), resume="latest",
                                                               **TINY_RUN)))
        logging.getLogger("trainer.train").removeHandler(log)
        fell_back = any("falling back" in m for m in log.messages)
        redone = [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004", "step-00000006"]
        rows.append(Row("checkpoints", f"{kind}: --resume", "fell back to step 4 with a warning",
                        f"{'fell back' if fell_back else 'no warning'}, run {status}", fell_back and status == "ok"
                        and redone, next((m for m in log.messages if "falling back" in m), message)))

        for folder in checkpoint_dirs(run):
            damage(folder / "checkpoint.pt", kind if kind != "non-finite" else "flipped")
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(run), resume="latest",
                                                               **{**TINY_RUN, "max_steps": 8})))
        rows.append(Row("checkpoints", f"{kind}: all damaged, --resume", "refused", status,
                        status == CorruptFileError.__name__, message))
    return rows


# ----------------------------------------------------------------------------------------- store


def bench_store(work: Path) -> list[Row]:
    rows = []
    for kind in (*DAMAGES, "missing"):
        store = work / f"store-{kind}"
        write_synthetic_store(store, 64, shard_size=32, seed=2)
        damage(store / shard_name(1), kind)
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(work / f"run-{kind}"),
                                                               **TINY_RUN)))
        named = shard_name(1) in message
        rows.append(Row("store", f"shard {kind}: train", "refused naming the shard",
                        status, status in (CorruptFileError.__name__, "FileNotFoundError") and named, message))

    manifest_damages = {
        "shards: null": lambda m: json.dumps({**m, "shards": None}),
        "manifest is a list": lambda m: json.dumps([m]),
        "shard_sha256 is a list": lambda m: json.dumps({**m, "shard_sha256": list(m["shard_sha256"].values())}),
        "truncated JSON": lambda m: json.dumps(m)[:200],
    }
    for case, edit in manifest_damages.items():
        store = work / f"manifest-{len(rows)}"
        manifest = write_synthetic_store(store, 16, shard_size=8)
        (store / "manifest.json").write_text(edit(manifest))
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(store / "run"),
                                                               **TINY_RUN)))
        named = "manifest.json" in message
        rows.append(Row("store", f"manifest {case}: train", "refused naming file and field", status,
                        status == CorruptFileError.__name__ and named, message))

    store = work / "store-one-nan"
    write_synthetic_store(store, 64, shard_size=32, seed=3)
    poison_samples(store, [split_indices(64, TINY_RUN["val_samples"], 0)[0][0]])
    status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(work / "run-one-nan"),
                                                           **TINY_RUN)))
    records = [json.loads(line) for line in (work / "run-one-nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_nonfinite"] for r in records if "skipped_nonfinite" in r][-1]
    from img_core.aligner import ImplicitAligner

    finite = status == "ok" and all(torch.isfinite(v).all() for v in
                                     ImplicitAligner.from_pretrained(message).state_dict().values())
    rows.append(Row("store", "one NaN sample: train", "skipped, counted, finite aligner saved",
                    f"skipped {skipped}, final {'finite' if finite else 'NOT finite'}", skipped >= 1 and finite))

    store = work / "store-all-nan"
    write_synthetic_store(store, 32, shard_size=32, seed=4)
    poison_samples(store, list(range(32)))
    run = work / "run-all-nan"
    status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(run),
                                                           **{**TINY_RUN, "max_skipped_in_a_row": 4})))
    saved_nonfinite = [p.name for p in checkpoint_dirs(run)
                       if not all(torch.isfinite(v).all() for v in load_checkpoint(p)["aligner"].values())]
    rows.append(Row("store", "all samples NaN: train", "stopped with an error, nothing non-finite saved",
                    f"{status}, final/ {'exists' if (run / 'final').exists() else 'absent'}",
                    status == CorruptFileError.__name__ and not (run / "final").exists() and not saved_nonfinite,
                    message))
    return rows


# ----------------------------------------------------------------------------------------- images


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of width x height: ~50 KB for 20000x20000."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to declare width x height."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("P", (16, 16)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    data[data.index(b"\x2c") + 5 : data.index(b"\x2c") + 9] = struct.pack("<HH", width, height)  # image size
    return bytes(data)


RSS_PROBE = """
import resource, sys, time
sys.path.insert(0, {repo!r})
from img_core.images import load_image
from img_core.errors import InvalidInputError
data = open({path!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    load_image(data)
    outcome = "decoded"
except InvalidInputError:
    outcome = "refused"
seconds = time.perf_counter() - start
print(outcome, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, seconds)
"""


def bench_images(work: Path) -> list[Row]:
    (work / "a folder.png").mkdir()
    (work / "notes.png").write_text("this is not an image")
    (work / "empty.png").write_bytes(b"")
    from PIL import Image

    noise = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noise, format="PNG")
    cases = {
        f"PNG {BOMB_SIDE}x{BOMB_SIDE} bomb": png_bomb(BOMB_SIDE, BOMB_SIDE),
        "PNG 13000x13000 bomb": png_bomb(13_000, 13_000),
        "PNG 8000x6000 (48 Mpx)": png_bomb(8000, 6000),
        "JPEG declaring 30000x30000": jpeg_declaring(30_000, 30_000),
        "GIF declaring 65535x65535": gif_declaring(65_535, 65_535),
        "folder": work / "a folder.png",
        "missing file": work / "missing.png",
        "text file named .png": work / "notes.png",
        "empty file": work / "empty.png",
        "random bytes": os.urandom(4096),
        "truncated PNG (half the file)": noise.getvalue()[: len(noise.getvalue()) // 2],
    }
    rows = []
    for case, source in cases.items():
        caught: list[str] = []
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            status, message = outcome_of(lambda: load_image(source))
            caught = [f"{w.category.__name__}" for w in raised]
        seconds = time.perf_counter() - start
        size = f"{len(source) / 1e3:.0f} KB, " if isinstance(source, bytes) else ""
        clean = status == InvalidInputError.__name__ and not caught
        rows.append(Row("images", case, "refused cleanly", f"{status}{' + ' + ','.join(caught) if caught else ''}",
                        clean, f"{size}{seconds * 1e3:.1f} ms: {message}"))

    bomb_path = work / "bomb.png"
    bomb_path.write_bytes(cases[f"PNG {BOMB_SIDE}x{BOMB_SIDE} bomb"])
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE.format(repo=str(REPO), path=str(bomb_path))],
                           capture_output=True, text=True, timeout=120)
    outcome, before_kb, after_kb, seconds = probe.stdout.split()
    growth_mb = (int(after_kb) - int(before_kb)) / 1024
    rows.append(Row("images", f"PNG {BOMB_SIDE}x{BOMB_SIDE} bomb, fresh process", "refused, < 10 MB peak RSS growth",
                    outcome, outcome == "refused" and growth_mb < 10,
                    f"{float(seconds) * 1e3:.1f} ms, peak RSS {int(before_kb) / 1024:.0f} -> {int(after_kb) / 1024:.0f} MB "
                    f"(+{growth_mb:.1f} MB); cap {MAX_MEGAPIXELS:g} Mpx"))
    return rows


# ----------------------------------------------------------------------------------------- main

SECTIONS = {"checkpoints": bench_checkpoints, "store": bench_store, "images": bench_images}


def print_table(rows: list[Row]) -> None:
    headers = ("section", "case", "expected", "observed", "ok", "detail")
    table = [(r.section, r.case, r.expected, r.observed, "yes" if r.ok else "NO", r.detail) for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers[:-1])]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)) + "  " + headers[-1]
    print(line)
    print("-" * len(line))
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("trainer").setLevel(logging.WARNING)  # the fallback warnings are part of the outcome
    torch.set_num_threads(1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        for name in args.sections:
            start = time.perf_counter()
            work = Path(tmp) / name
            work.mkdir()
            section_rows = SECTIONS[name](work)
            for row in section_rows:  # paths relative to the section's scratch folder
                row.detail = short(row.detail.replace(str(work) + "/", ""))
            rows += section_rows
            print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print_table(rows)
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} outcomes as wanted")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
