"""Trainer reliability figures (issue 19 items 2, 4, 5; issue 15 item 6): damaged stores and runs, sizes,
failing commands, multi-process skips. Prints one row per case: what was wanted, what happened, how long.

    python benchmarks/bench_trainer_reliability.py                      # every section (~3 min on 2 cores)
    python benchmarks/bench_trainer_reliability.py --sections store runs sizes commands

Sections:
  store     a shard with 128 values changed (up to +977.5) and the manifest truncated or missing: rerun
            trainer.extract (tiny-sdxl) and count the values that still differ from the original
  runs      every checkpoint damaged, then --resume three times (each must refuse; final/ and metrics kept),
            then --restart; a checkpoint without checksums; a damaged final/ given to --init-from; a damaged
            metrics.jsonl line on --resume
  sizes     --batch-size 100000 on a 387-sample store (it used to grow to 23 GB): time and memory to refusal
  commands  failing commands of extract / train / finetune_mllm: lines printed, empty --out folders left
  finetune  2-process finetune_mllm (gloo, CPU) with an unreadable image in one process's last micro-batch;
            a SIGKILLed finetune_mllm resumed to the uninterrupted run's LoRA weights
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # helpers.png_bytes: the tests' deterministic tiny PNGs

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from helpers import png_bytes  # noqa: E402

from img_core.errors import CorruptFileError  # noqa: E402
from img_core.tiny.models import ensure_tiny_models  # noqa: E402
from trainer.extract import ExtractConfig, extract  # noqa: E402
from trainer.extract import main as extract_main  # noqa: E402
from trainer.finetune_mllm import (  # noqa: E402
    FinetuneConfig,
    finetune,
    load_finetune_checkpoint,
    micro_batch_rows,
)
from trainer.finetune_mllm import main as finetune_main  # noqa: E402
from trainer.store import FeatureStore, shard_name, write_synthetic_store  # noqa: E402
from trainer.train import TrainConfig, train  # noqa: E402
from trainer.train import main as train_main  # noqa: E402

TINY_RUN = {"depth": 2, "heads": 2, "dim_head": 16, "lr": 3e-3, "batch_size": 8, "val_samples": 8,
            "val_every": 1000, "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 3, "max_steps": 6}
COLOURS = ["red", "blue", "green", "yellow"]


@dataclass
class Row:
    section: str
    case: str
    expected: str
    observed: str
    ok: bool
    seconds: float


def outcome(action) -> tuple[str, str, float]:
    """(exception class name or "ok", message, seconds) of calling `action`."""
    start = time.perf_counter()
    try:
        action()
        return "ok", "", time.perf_counter() - start
    except (ValueError, FileNotFoundError, CorruptFileError) as error:
        return type(error).__name__, str(error), time.perf_counter() - start


def pick_a_pic(folder: Path) -> Path:
    folder.mkdir(parents=True)
    captions = ["a red cube on a table", "a blue sphere in the snow", "a cat wearing a hat", "two dogs playing chess"]
    pq.write_table(pa.table({
        "caption": captions,
        "jpg_0": pa.array([png_bytes(2 * i) for i in range(4)], pa.binary()),
        "jpg_1": pa.array([png_bytes(2 * i + 1) for i in range(4)], pa.binary()),
        "label_0": [1.0, 0.0, 1.0, 0.0], "label_1": [0.0, 1.0, 0.0, 1.0],
    }), folder / "train.parquet")
    return folder


def edit_triplets(folder: Path, broken_row: int | None = None) -> Path:
    folder.mkdir(parents=True)
    images = [{"bytes": png_bytes(i, 40, 40), "path": None} for i in range(len(COLOURS))]
    if broken_row is not None:
        images[broken_row] = {"bytes": b"\x89PNG broken", "path": None}
    pq.write_table(pa.table({
        "original_image": pa.array(images),
        "edited_prompt": [f"a photo of a {colour} house" for colour in COLOURS],
        "edit_prompt": [f"make the house {colour}" for colour in COLOURS],
    }), folder / "train.parquet")
    return folder


# ----------------------------------------------------------------------------------------- store


def bench_store(work: Path) -> list[Row]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    dataset = pick_a_pic(work / "pairs")
    original = work / "original"
    extract(ExtractConfig(dataset=str(dataset), out=str(original), preset="tiny-sdxl", shard_size=2))
    rows = []
    for manifest_damage in ("truncated", "missing"):
        store = work / f"store-{manifest_damage}"
        store.mkdir()
        for path in original.iterdir():
            (store / path.name).write_bytes(path.read_bytes())
        shard = store / shard_name(1)
        with safe_open(str(shard), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
        tensors["image_l"].view(-1)[:128] += 977.5
        save_file(tensors, str(shard), metadata=metadata)
        manifest = store / "manifest.json"
        if manifest_damage == "truncated":
            manifest.write_text(manifest.read_text()[:200])
        else:
            manifest.unlink()
        status, message, seconds = outcome(lambda: extract(ExtractConfig(dataset=str(dataset), out=str(store),
                                                                         preset="tiny-sdxl", shard_size=2)))
        repaired, reference = FeatureStore(store), FeatureStore(original)
        changed = sum(int((repaired[i]["image_l"] != reference[i]["image_l"]).sum()) for i in range(len(reference)))
        rows.append(Row("store", f"shard +977.5 x128, manifest {manifest_damage}: rerun extract",
                        "shard re-extracted, 0 values differ", f"{status}, {changed} values differ",
                        status == "ok" and changed == 0, seconds))
    return rows


# ----------------------------------------------------------------------------------------- runs


def bench_runs(work: Path) -> list[Row]:
    store = work / "store"
    write_synthetic_store(store, 64, shard_size=32, seed=1)
    run = work / "run"
    train(TrainConfig(features=str(store), out=str(run), **TINY_RUN))
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes()[:1000])
    final, metrics = (run / "final" / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()
    rows = []
    for attempt in (1, 2, 3):
        status, message, seconds = outcome(lambda: train(TrainConfig(features=str(store), out=str(run),
                                                                     resume="latest", **TINY_RUN)))
        kept = (run / "final" / "model.safetensors").read_bytes() == final and (run / "metrics.jsonl").read_text() == metrics
        rows.append(Row("runs", f"all checkpoints damaged: --resume #{attempt}", "refused, final/ and metrics kept",
                        f"{status}, {'kept' if kept else 'OVERWRITTEN'}", status == "CorruptFileError" and kept, seconds))
    status, message, seconds = outcome(lambda: train(TrainConfig(features=str(store), out=str(run), restart=True,
                                                                 **TINY_RUN)))
    aside = (work / "run.damaged-1" / "final" / "model.safetensors").read_bytes() == final
    rows.append(Row("runs", "then --restart", "damaged run moved aside, new run done",
                    f"{status}, old final/ {'kept aside' if aside else 'LOST'}", status == "ok" and aside, seconds))

    (run / "checkpoints" / "step-00000006" / "SHA256SUMS").unlink()
    status, message, seconds = outcome(lambda: train(TrainConfig(features=str(store), out=str(run), resume="latest",
                                                                 **TINY_RUN)))
    fell_back = (run / "checkpoints" / "damaged-step-00000006").is_dir()
    rows.append(Row("runs", "checkpoint without checksums: --resume", "not loaded unverified (falls back)",
                    f"{status}, {'fell back to step 4' if fell_back else 'LOADED'}", status == "ok" and fell_back,
                    seconds))

    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    status, message, seconds = outcome(lambda: train(TrainConfig(features=str(store), out=str(work / "next"),
                                                                 init_from=str(run / "final"), **TINY_RUN)))
    rows.append(Row("runs", "final/ damaged: --init-from", "refused naming the file", status,
                    status == "CorruptFileError" and "model.safetensors" in message, seconds))

    cut = work / "cut"
    train(TrainConfig(features=str(store), out=str(cut), **{**TINY_RUN, "max_steps": 4}))
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    status, message, seconds = outcome(lambda: train(TrainConfig(features=str(store), out=str(cut), resume="latest",
                                                                 **TINY_RUN)))
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    rows.append(Row("runs", "damaged metrics.jsonl line: --resume", "line skipped with a warning, run done",
                    f"{status}, steps logged {steps}", status == "ok" and steps[-1] == 6, seconds))
    return rows


# ----------------------------------------------------------------------------------------- sizes


def bench_sizes(work: Path) -> list[Row]:
    store = work / "store"
    write_synthetic_store(store, 387, shard_size=128, seed=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status, message, seconds = outcome(lambda: train(TrainConfig(features=str(store), out=str(work / "run"),
                                                                 **{**TINY_RUN, "batch_size": 100_000})))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    left = (work / "run").exists()
    return [Row("sizes", "--batch-size 100000 on 387 samples", "refused before work, no --out",
                f"{status} (+{grown:.0f} MB peak), --out {'LEFT' if left else 'absent'}: {message[:70]}",
                status == "ValueError" and not left, seconds)]


# ----------------------------------------------------------------------------------------- commands


def bench_commands(work: Path) -> list[Row]:
    store = work / "store"
    write_synthetic_store(store, 32, shard_size=32, seed=1)
    ip2p = edit_triplets(work / "ip2p")
    cases = {
        "train: --batch-size many": (train_main, ["--features", str(store), "--batch-size", "many"]),
        "train: --batch-size 100000": (train_main, ["--features", str(store), "--val-samples", "4",
                                                    "--batch-size", "100000"]),
        "train: missing store": (train_main, ["--features", str(work / "nothing")]),
        "train: --resume with --restart": (train_main, ["--features", str(store), "--val-samples", "4", "--resume",
                                                        "--restart"]),
        "extract: --shard-size x": (extract_main, ["--dataset", str(work / "nothing"), "--shard-size", "x"]),
        "extract: missing dataset": (extract_main, ["--dataset", str(work / "nothing")]),
        "extract: --critique-column in question mode": (extract_main, ["--dataset", str(work / "nothing"),
                                                                        "--critique-column", "c"]),
        "finetune: --epochs none": (finetune_main, ["--dataset", str(ip2p), "--epochs", "none"]),
        "finetune: --batch-size 8 on 4 rows": (finetune_main, ["--dataset", str(ip2p), "--base", "tiny-llava",
                                                               "--batch-size", "8"]),
        "finetune: missing dataset": (finetune_main, ["--dataset", str(work / "nothing"), "--base", "tiny-llava"]),
    }
    rows = []
    for number, (case, (command, argv)) in enumerate(cases.items()):
        out = work / f"out-{number}" / "nested"
        stderr = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(stderr):
            try:
                command([*argv, "--out", str(out)])
                code = 0
            except SystemExit as exit_info:
                code = exit_info.code
        seconds = time.perf_counter() - start
        printed = stderr.getvalue() + (code + "\n" if isinstance(code, str) else "")
        lines = [line for line in printed.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
        left = (work / f"out-{number}").exists()
        rows.append(Row("commands", case, "1 line, exit != 0, no --out", f"{len(lines)} line(s), exit "
                        f"{code if isinstance(code, int) else 1}, --out {'LEFT' if left else 'absent'}",
                        len(lines) == 1 and code != 0 and not left, seconds))
    return rows


# ----------------------------------------------------------------------------------------- finetune


def bench_finetune(work: Path) -> list[Row]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rows = []
    broken = next(micro_batch_rows(len(COLOURS), 1, 1, 2, 0, start=1))[0][0]  # process 1's last micro-batch
    dataset = edit_triplets(work / "broken", broken_row=broken)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer.finetune_mllm", "--dataset", str(dataset), "--base", "tiny-llava",
               "--out", str(work / "two"), "--batch-size", "1", "--gradient-accumulation-steps", "2",
               "--max-steps", "1", "--lora-rank", "4", "--save-dtype", "float32"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, env={**env, "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                                text=True, timeout=300, start_new_session=True)
        observed, ok = f"exit {result.returncode}", result.returncode == 0
    except subprocess.TimeoutExpired:
        observed, ok = "HUNG (300 s timeout)", False
    rows.append(Row("finetune", "2 processes, unreadable image in process 1's last micro-batch", "finishes",
                    observed, ok, time.perf_counter() - start))

    args = ["--dataset", str(edit_triplets(work / "ip2p")), "--base", "tiny-llava", "--batch-size", "1",
            "--gradient-accumulation-steps", "2", "--lr", "5e-3", "--lora-rank", "4", "--lora-dropout", "0.2",
            "--save-dtype", "float32", "--checkpoint-every", "2", "--max-steps", "24"]
    killed = work / "killed"
    process = subprocess.Popen([sys.executable, "-m", "trainer.finetune_mllm", *args, "--out", str(killed)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "checkpoints" / "step-00000004").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    start = time.perf_counter()
    status, message, _ = outcome(lambda: finetune(FinetuneConfig(**{**vars(parse_args(args)), "out": str(killed),
                                                                    "resume": "latest"})))
    seconds = time.perf_counter() - start
    finetune(FinetuneConfig(**{**vars(parse_args(args)), "out": str(work / "straight")}))

    def last_lora(out: Path) -> dict:
        return load_finetune_checkpoint(sorted((out / "checkpoints").glob("step-*"))[-1])["lora"]

    a, b = last_lora(killed), last_lora(work / "straight")
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows.append(Row("finetune", "SIGKILL after step 4, --resume", "LoRA weights equal the uninterrupted run's",
                    f"{status}, {'bit-identical' if equal else 'DIFFERENT'}", status == "ok" and equal, seconds))
    return rows


def parse_args(argv: list[str]):
    from trainer import parse_config

    return parse_config(FinetuneConfig, argv)


# ----------------------------------------------------------------------------------------- main

SECTIONS = {"store": bench_store, "runs": bench_runs, "sizes": bench_sizes, "commands": bench_commands,
            "finetune": bench_finetune}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-reliability-") as tmp:
        os.environ.setdefault("IMG_TINY_DIR", str(Path(tmp) / "tiny"))
        ensure_tiny_models(Path(os.environ["IMG_TINY_DIR"]))  # built once, before any process needs them
        rows: list[Row] = []
        for name in args.sections:
            work = Path(tmp) / name
            work.mkdir()
            rows += SECTIONS[name](work)
    headers = ("section", "case", "expected", "observed", "ok", "s")
    table = [(r.section, r.case, r.expected, r.observed, "yes" if r.ok else "NO", f"{r.seconds:.2f}") for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} outcomes as wanted")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
