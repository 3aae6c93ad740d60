"""Trainer throughput and storage figures.

    python benchmarks/bench_trainer.py                    # everything (CPU: ~5-10 min on 2 cores)
    python benchmarks/bench_trainer.py --skip-real-dims   # only the tiny store-vs-online comparison

Prints:
  1. tiny-sdxl preset: extraction samples/s, training samples/s from a store vs `--online`
     (same tiny aligner, same pairs; online pays the IP-Adapter and MLLM forward passes every step);
  2. real-dims aligner (SDXL 2048 wide / 16 tokens, FLUX 4096 wide / 4 tokens, guidance 5120 wide and
     --guidance-tokens long, random features read from a float16 store): training samples/s of the IUPO
     step (aligner + reference forward, backward, AdamW) on this machine's device;
  3. store bytes per sample (float16) at real dims, measured and from the format, and the store size
     for Pick-a-Pic's 851 K pairs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from img_core.aligner import AlignerConfig, ImplicitAligner  # noqa: E402
from trainer.objective import iupo_loss  # noqa: E402
from trainer.store import (  # noqa: E402
    FeatureStore,
    bytes_per_sample,
    collate_features,
    write_synthetic_store,
)
from trainer.train import TrainConfig, to_device, train  # noqa: E402

PICK_A_PIC_PAIRS = 851_000  # REFERENCE §6
REAL_DIMS = {  # name: (image_dim, image_tokens) of the IP-Adapter features (REFERENCE §3)
    "SDXL": (2048, 16),
    "FLUX": (4096, 4),
}
GUIDANCE_DIM = 5120  # LLaVA-1.5-13B hidden size


def write_pick_a_pic(folder: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "caption": [f"a photo of object number {i} on a table" for i in range(rows)],
        "jpg_0": pa.array([png(2 * i) for i in range(rows)], pa.binary()),
        "jpg_1": pa.array([png(2 * i + 1) for i in range(rows)], pa.binary()),
        "label_0": [float(i % 2) for i in range(rows)],
        "label_1": [float(1 - i % 2) for i in range(rows)],
    })
    pq.write_table(table, folder / "train-00000.parquet")


def last_samples_per_s(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "samples_per_s" in r][-1]["samples_per_s"]


def bench_store_vs_online(work: Path, rows: int, steps: int, batch_size: int) -> None:
    from trainer.extract import ExtractConfig, extract

    write_pick_a_pic(work / "pairs", rows)
    start = time.perf_counter()
    manifest = extract(ExtractConfig(dataset=str(work / "pairs"), out=str(work / "store"), preset="tiny-sdxl",
                                     shard_size=64))
    extract_seconds = time.perf_counter() - start  # includes loading the tiny models
    tiny = {"depth": 2, "heads": 2, "dim_head": 16, "batch_size": batch_size, "max_steps": steps,
            "val_samples": 0, "log_every": steps // 2, "checkpoint_every": steps}
    train(TrainConfig(features=str(work / "store"), out=str(work / "run_store"), **tiny))
    train(TrainConfig(online=True, dataset=str(work / "pairs"), preset="tiny-sdxl", out=str(work / "run_online"),
                      **tiny))
    store_rate, online_rate = last_samples_per_s(work / "run_store"), last_samples_per_s(work / "run_online")
    print("\n== 1. tiny-sdxl: store vs --online (aligner depth 2, batch %d, %d steps) ==" % (batch_size, steps))
    print(f"extraction        {manifest['num_samples'] / extract_seconds:8.1f} samples/s  (incl. model loading; "
          f"{manifest['num_samples']} pairs, guidance {manifest['guidance_dim']} wide)")
    print(f"train from store  {store_rate:8.1f} samples/s")
    print(f"train --online    {online_rate:8.1f} samples/s   ({store_rate / online_rate:.0f}x slower than the store)")


def bench_real_dims(work: Path, name: str, steps: int, batch_size: int, guidance_tokens: int) -> None:
    image_dim, image_tokens = REAL_DIMS[name]
    store_dir = work / f"store_{name}"
    num_samples = batch_size * (steps + 1)
    manifest = write_synthetic_store(store_dir, num_samples, image_tokens=image_tokens, image_dim=image_dim,
                                     guidance_dim=GUIDANCE_DIM, guidance_tokens=(guidance_tokens, guidance_tokens),
                                     shard_size=num_samples, dtype="float16")
    store = FeatureStore(store_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = AlignerConfig(image_dim=image_dim, guidance_dim=GUIDANCE_DIM, num_image_tokens=image_tokens)  # paper shape
    aligner = ImplicitAligner(config).to(device)
    reference = ImplicitAligner(aligner.config).to(device).requires_grad_(False)
    reference.load_state_dict(aligner.state_dict())
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=1e-4, weight_decay=1e-4)
    parameters = sum(p.numel() for p in aligner.parameters())

    timings = []
    for step in range(steps + 1):  # step 0 warms up (allocations, AdamW state)
        start = time.perf_counter()
        samples = [store[i] for i in range(step * batch_size, (step + 1) * batch_size)]
        batch = to_device(collate_features(samples), device)
        pred = aligner(batch["image_l"], batch["guidance"], batch["guidance_mask"])
        with torch.no_grad():
            ref = reference(batch["image_l"], batch["guidance"], batch["guidance_mask"])
        loss, _ = iupo_loss(pred, ref, batch["image_w"], batch["image_l"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    seconds = float(np.mean(timings[1:]))
    print(f"{name:5s} D={image_dim} Si={image_tokens} Sg={guidance_tokens}: {parameters / 1e6:6.1f} M params, "
          f"{batch_size / seconds:6.2f} samples/s ({seconds:.2f} s/step, batch {batch_size}, {device}, "
          f"{torch.get_num_threads()} threads); store {manifest['bytes_per_sample'] / 1e6:.2f} MB/sample measured")
    del aligner, reference, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="tiny pairs to extract")
    parser.add_argument("--tiny-steps", type=int, default=40, help="training steps for store and online runs")
    parser.add_argument("--tiny-batch-size", type=int, default=8)
    parser.add_argument("--real-steps", type=int, default=3, help="timed steps per real-dims aligner")
    parser.add_argument("--real-batch-size", type=int, default=2)
    parser.add_argument("--guidance-tokens", type=int, default=600, help="Sg: LLaVA-1.5 576 image tokens + text")
    parser.add_argument("--skip-real-dims", action="store_true")
    parser.add_argument("--skip-flux", action="store_true", help="FLUX dims need ~14 GB of memory on CPU")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        bench_store_vs_online(work, args.rows, args.tiny_steps, args.tiny_batch_size)
        if not args.skip_real_dims:
            print("\n== 2. real-dims aligner training (IUPO step, random features from a float16 store) ==")
            for name in REAL_DIMS:
                if name == "FLUX" and args.skip_flux:
                    continue
                bench_real_dims(work, name, args.real_steps, args.real_batch_size, args.guidance_tokens)

    print(f"\n== 3. store bytes per sample (float16, Sg = {args.guidance_tokens}) ==")
    for name, (image_dim, image_tokens) in REAL_DIMS.items():
        size = bytes_per_sample(image_tokens, image_dim, args.guidance_tokens, GUIDANCE_DIM, "float16")
        print(f"{name:5s} {size / 1e6:6.2f} MB/sample (guidance {args.guidance_tokens * GUIDANCE_DIM * 2 / size:.0%}); "
              f"Pick-a-Pic {PICK_A_PIC_PAIRS // 1000} K pairs -> {size * PICK_A_PIC_PAIRS / 1e12:.2f} TB")


if __name__ == "__main__":
    main()
