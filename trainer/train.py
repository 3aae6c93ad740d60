"""Train the Implicit Aligner with the Iteratively Updated Preference Objective (REFERENCE §6).

    python -m trainer.train --features STORE --out RUN
    accelerate launch -m trainer.train --features STORE --out RUN --batch-size 8
    python -m trainer.train --online --dataset PARQUET_DIR --preset sdxl --out RUN
    python -m trainer.train --features STORE --out RUN --resume          # continue from the newest checkpoint

RUN/ gets config.json (this run's settings), metrics.jsonl (one JSON object per log or validation
step), checkpoints/step-NNNNNNNN/checkpoint.pt (written atomically) and final/ (an aligner folder that
`ImplicitAligner.from_pretrained` and the app load, with the store's metadata and the step count).

Data order: every epoch is a permutation of the training indices seeded by (seed, epoch); the epochs are
concatenated into one stream and process p of P takes samples [p*B, (p+1)*B) of each group of P*B. The
position in that stream is a pure function of the number of samples consumed, which the checkpoint
stores, so a resumed run sees exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import option, parse_config
from trainer.objective import REDUCTIONS, ReferenceUpdater, iupo_loss, squared_distance
from trainer.store import FeatureStore, collate_features

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# Settings that change the trajectory of a run: a resume must use the values in the checkpoint.
TRAJECTORY_SETTINGS = (
    "features", "online", "dataset", "preset", "guidance_mode", "init_from", "depth", "heads", "dim_head",
    "ff_mult", "lam", "ref_update_k", "reduction", "lr", "weight_decay", "batch_size",
    "gradient_accumulation_steps", "mixed_precision", "seed", "val_samples",
)


@dataclass
class TrainConfig:
    # data
    features: str | None = option(None, "feature store folder (img-features/1) from trainer.extract")
    out: str = option("runs/aligner", "run folder: config.json, metrics.jsonl, checkpoints/, final/")
    online: bool = option(False, "compute features inside the loop from --dataset with --preset instead of a store")
    dataset: str | None = option(None, "--online: folder of Pick-a-Pic-style parquet files or a hub dataset id")
    preset: str | None = option(None, "--online: img_core preset whose IP-Adapter and MLLM make the features")
    guidance_mode: str = option("question", "--online: MLLM guidance mode", choices=["question", "dialogue"])
    device: str | None = option(None, "--online: device for the preset's models (default: the accelerator's)")
    val_samples: int = option(500, "held-out samples for validation (0 = none; the paper's ablations use 500 prompts)")
    num_workers: int = option(0, "DataLoader worker processes reading the store")
    # model
    init_from: str | None = option(None, "aligner to start from: a save_pretrained folder or an official .pth")
    depth: int = option(4, "aligner blocks (paper: 4)")
    heads: int = option(20, "attention heads (paper: 20)")
    dim_head: int = option(64, "width per head (paper: 64)")
    ff_mult: int = option(4, "feed-forward expansion (paper: 4)")
    # objective
    lam: float = option(1.0, "weight of the preference term L_pref (paper: 1)")
    ref_update_k: int = option(10, "consecutive wins over the reference before it is replaced (paper: 10)")
    reduction: str = option("mean", "||.||^2 over tokens and channels", choices=list(REDUCTIONS))
    # optimisation
    lr: float = option(1e-4, "AdamW learning rate, constant (paper: 1e-4)")
    weight_decay: float = option(1e-4, "AdamW weight decay (paper: 1e-4)")
    batch_size: int = option(8, "samples per process per micro-batch (paper: 8)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(100_000, "optimizer steps to train in total (paper: 100K)")
    mixed_precision: str = option("no", "autocast dtype for the forward passes", choices=["no", "fp16", "bf16"])
    seed: int = option(0, "seed of the initialisation and the data order")
    # bookkeeping
    log_every: int = option(10, "steps between metrics.jsonl lines")
    val_every: int = option(1000, "steps between validations (also at the end)")
    checkpoint_every: int = option(1000, "steps between checkpoints (also at the end)")
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk")
    resume: str | None = option(
        None, "checkpoint folder to continue from; the flag alone means the newest in OUT/checkpoints", const="latest"
    )

    def check(self) -> None:
        if self.online:
            if not (self.dataset and self.preset):
                raise ValueError("--online needs --dataset and --preset")
            if self.features:
                raise ValueError(f"pass either --features ({self.features}) or --online, not both")
        elif not self.features:
            raise ValueError("--features STORE is required (or --online --dataset SRC --preset P)")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "val_every",
                     "checkpoint_every", "keep_checkpoints", "ref_update_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.val_samples < 0:
            raise ValueError(f"--val-samples must be >= 0, got {self.val_samples}")


# ----------------------------------------------------------------------------------------- data order


def split_indices(num_samples: int, val_samples: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of the store into (train, held-out) index lists."""
    if val_samples >= num_samples:
        raise ValueError(
            f"--val-samples {val_samples} leaves no training data in a source of {num_samples} samples; "
            f"pass a smaller --val-samples (0 disables validation)"
        )
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[val_samples:]), sorted(order[:val_samples])


class StreamBatchSampler(torch.utils.data.Sampler):
    """Infinite batches of this process's share of the seeded sample stream, from sample `start` on.

    Stream position i holds train_indices[permutation(seed, epoch = i // N)[i % N]]; a global batch is
    P*B consecutive positions and process p takes positions [p*B, (p+1)*B) of it."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, start: int, rank: int, world: int):
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        self.start, self.rank, self.world = start, rank, world

    def position(self, i: int, cache: dict) -> int:
        epoch, offset = divmod(i, len(self.indices))
        if epoch not in cache:
            cache.clear()
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(len(self.indices), generator=generator).tolist()
        return self.indices[cache[epoch][offset]]

    def __iter__(self):
        cache: dict[int, list[int]] = {}
        first = self.start + self.rank * self.batch_size
        while True:
            yield [self.position(i, cache) for i in range(first, first + self.batch_size)]
            first += self.world * self.batch_size


# ----------------------------------------------------------------------------------------- helpers


def build_aligner(cfg: TrainConfig, manifest: dict):
    """A fresh aligner shaped to the data (or the --init-from one), carrying the data's metadata."""
    from img_core.aligner import FLUX_FEATURES, SDXL_FEATURES, AlignerConfig, ImplicitAligner

    kind = manifest.get("image_feature_kind") or (FLUX_FEATURES if manifest["image_dim"] == 4096 else SDXL_FEATURES)
    metadata = {
        "num_image_tokens": manifest["image_tokens"],
        "image_feature_kind": kind,
        "mllm": manifest.get("mllm"),
        "guidance_mode": manifest.get("guidance_mode", "question"),
        "chat_template": manifest.get("chat_template"),
    }
    if cfg.init_from is None:
        config = AlignerConfig(
            image_dim=manifest["image_dim"], guidance_dim=manifest["guidance_dim"], depth=cfg.depth,
            heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult, **metadata,
        )
        return ImplicitAligner(config)
    path = Path(cfg.init_from)
    if path.is_dir():
        aligner = ImplicitAligner.from_pretrained(path)
    elif path.is_file():
        aligner = ImplicitAligner.from_official_checkpoint(path, dim_head=cfg.dim_head)  # heads = width / dim_head
    else:
        raise FileNotFoundError(f"--init-from {path} is neither an aligner folder nor a .pth file")
    dims = (aligner.config.image_dim, aligner.config.guidance_dim)
    if dims != (manifest["image_dim"], manifest["guidance_dim"]):
        raise ValueError(
            f"--init-from {path} has (image_dim, guidance_dim) = {dims}, the data has "
            f"({manifest['image_dim']}, {manifest['guidance_dim']})"
        )
    aligner.config = dataclasses.replace(aligner.config, **metadata)
    return aligner


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, torch.float32 if v.is_floating_point() else v.dtype) for k, v in batch.items()}


@torch.no_grad()
def evaluate(aligner, source, indices: list[int], batch_size: int, accelerator) -> dict[str, float]:
    """Held-out MSE to the winner: one aligner pass vs the identity (the loser's own features)."""
    own = indices[accelerator.process_index :: accelerator.num_processes]
    sums = torch.zeros(4, device=accelerator.device)  # aligner MSE, identity MSE, aligner wins, count
    for start in range(0, len(own), batch_size):
        samples = [s for s in (source[i] for i in own[start : start + batch_size]) if s is not None]
        if not samples:
            continue
        batch = to_device(collate_features(samples), accelerator.device)
        with accelerator.autocast():
            aligned = aligner(batch["image_l"], batch["guidance"], batch["guidance_mask"])
        mse = squared_distance(batch["image_w"], aligned)  # (B,)
        mse_identity = squared_distance(batch["image_w"], batch["image_l"])  # (B,)
        wins = (mse < mse_identity).float()
        sums += torch.stack([mse.sum(), mse_identity.sum(), wins.sum(), wins.new_tensor(len(wins))])
    sums = accelerator.reduce(sums, reduction="sum")
    count = max(sums[3].item(), 1.0)
    return {"val_mse": sums[0].item() / count, "val_mse_identity": sums[1].item() / count,
            "val_win_rate": sums[2].item() / count}


def rng_state() -> dict:
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


def checkpoint_dirs(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*[0-9]"))


def atomic_save_dir(write, final: Path) -> None:
    """Call write(tmp_dir), then move tmp_dir to `final` (replacing an older `final`)."""
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.with_name("." + final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS_NAME, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def open_source(cfg: TrainConfig, device: torch.device):
    if not cfg.online:
        return FeatureStore(cfg.features)
    from trainer.extract import OnlineTriplets

    return OnlineTriplets(cfg.dataset, cfg.preset, cfg.guidance_mode, device=cfg.device or str(device), seed=cfg.seed)


# ----------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig) -> Path:
    """Run (or continue) training; returns RUN/final."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.check()
    out = Path(cfg.out)

    # 1. accelerator, data
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    source = open_source(cfg, accelerator.device)
    train_indices, val_indices = split_indices(len(source), cfg.val_samples, cfg.seed)

    # 2. aligner, reference aligner (starts as a copy: a fresh aligner is the identity), optimizer
    aligner = build_aligner(cfg, source.manifest)
    reference = copy.deepcopy(aligner).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    updater = ReferenceUpdater(k=cfg.ref_update_k)
    step, samples_seen = 0, 0

    # 3. resume
    resume_dir = None
    if cfg.resume == "latest":
        resume_dir = (checkpoint_dirs(out) or [None])[-1]
        if resume_dir is None:
            logger.info("no checkpoint in %s: starting from scratch", out / "checkpoints")
    elif cfg.resume:
        resume_dir = Path(cfg.resume)
        if not (resume_dir / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"--resume {resume_dir} has no {CHECKPOINT_NAME}")
    elif checkpoint_dirs(out):
        raise ValueError(f"{out} already has checkpoints: pass --resume to continue it, or choose another --out")
    checkpoint = None
    if resume_dir is not None:
        checkpoint = torch.load(resume_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
        changed = [k for k in TRAJECTORY_SETTINGS if checkpoint["config"].get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(
                f"cannot resume {resume_dir} exactly: settings changed since the checkpoint: "
                + ", ".join(f"{k} {checkpoint['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            )
        aligner.load_state_dict(checkpoint["aligner"])
        reference.load_state_dict(checkpoint["reference"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        updater.load_state_dict(checkpoint["updater"])
        step, samples_seen = checkpoint["step"], checkpoint["samples_seen"]
        logger.info("resuming from %s at step %d", resume_dir, step)

    reference.to(accelerator.device)
    aligner, optimizer = accelerator.prepare(aligner, optimizer)
    if checkpoint is not None:
        if accelerator.scaler is not None and checkpoint.get("scaler"):
            accelerator.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if (out / METRICS_NAME).exists():  # drop lines a killed run logged after its last checkpoint
            lines = (out / METRICS_NAME).read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            (out / METRICS_NAME).write_text("".join(line + "\n" for line in kept))

    sampler = StreamBatchSampler(train_indices, cfg.batch_size, cfg.seed, samples_seen,
                                 accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(source, batch_sampler=sampler, collate_fn=collate_or_none,
                                         num_workers=cfg.num_workers)
    batches = iter(loader)
    samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    logger.info("%d training / %d held-out samples; %d process(es) x %d x %d accumulation = %d samples per step",
                len(train_indices), len(val_indices), accelerator.num_processes, cfg.batch_size,
                cfg.gradient_accumulation_steps, samples_per_step)

    def save_checkpoint() -> None:
        state = {
            "step": step,
            "samples_seen": samples_seen,
            "aligner": accelerator.unwrap_model(aligner).state_dict(),
            "reference": reference.state_dict(),
            "optimizer": optimizer.state_dict(),
            "updater": updater.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": rng_state(),
            "config": dataclasses.asdict(cfg),
            "aligner_config": accelerator.unwrap_model(aligner).config.to_dict(),
        }
        if accelerator.is_main_process:
            folder = out / "checkpoints" / f"step-{step:08d}"
            atomic_save_dir(lambda tmp: torch.save(state, tmp / CHECKPOINT_NAME), folder)
            for old in checkpoint_dirs(out)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def validate() -> None:
        if not val_indices:
            return
        aligner.eval()
        metrics = evaluate(accelerator.unwrap_model(aligner), source, val_indices, cfg.batch_size, accelerator)
        aligner.train()
        if accelerator.is_main_process:
            append_metrics(out, {"step": step, **metrics})
            progress.write(
                f"step {step}: val_mse {metrics['val_mse']:.4g} (identity {metrics['val_mse_identity']:.4g})"
            )

    # 4. the loop: one iteration = one optimizer step over gradient_accumulation_steps micro-batches
    progress = tqdm(total=cfg.max_steps, initial=step, desc="aligner", disable=not accelerator.is_main_process)
    logged = ("loss", "base", "pref", "win_rate")
    window = torch.zeros(len(logged) + 1, device=accelerator.device)  # sums of `logged`, micro-batch count
    window_start, window_steps = time.perf_counter(), 0
    aligner.train()
    while step < cfg.max_steps:
        distances = torch.zeros(2, device=accelerator.device)  # sum of d(c_w, f), d(c_w, f_ref)
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            samples_seen += cfg.batch_size * accelerator.num_processes
            if batch is None:  # every image of this micro-batch was unreadable (online mode only)
                continue
            batch = to_device(batch, accelerator.device)
            with accelerator.accumulate(aligner):
                with accelerator.autocast():
                    pred = aligner(batch["image_l"], batch["guidance"], batch["guidance_mask"])  # (B, Si, D)
                    with torch.no_grad():
                        ref = reference(batch["image_l"], batch["guidance"], batch["guidance_mask"])  # (B, Si, D)
                loss, stats = iupo_loss(
                    pred, ref, batch["image_w"], batch["image_l"], lam=cfg.lam, reduction=cfg.reduction
                )
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            distances += torch.stack([stats["dist_pred"], stats["dist_ref"]])
            window += torch.stack([loss.detach(), *(stats[key] for key in logged[1:]), torch.ones_like(loss)])
        step += 1
        window_steps += 1
        progress.update(1)

        # reference update: "closer" is decided on the step's mean distances over all processes
        distances = accelerator.reduce(distances, reduction="sum")
        if updater.step(bool(distances[0] < distances[1])):
            reference.load_state_dict(accelerator.unwrap_model(aligner).state_dict())

        if step % cfg.log_every == 0:  # means over the window's micro-batches of all processes
            sums = accelerator.reduce(window, reduction="sum").tolist()
            record = {"step": step, **{k: v / max(sums[-1], 1) for k, v in zip(logged, sums)},
                      "ref_updates": updater.updates, "lr": optimizer.param_groups[0]["lr"],
                      "samples_per_s": window_steps * samples_per_step / (time.perf_counter() - window_start)}
            if accelerator.is_main_process:
                append_metrics(out, record)
                progress.set_postfix(loss=f"{record['loss']:.4g}", ref_updates=updater.updates)
            window.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            validate()
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint()
    progress.close()

    # 5. the trained aligner, with the data's metadata and the step count
    final = out / "final"
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(aligner)
        trained.config = dataclasses.replace(trained.config, training_steps=step)
        atomic_save_dir(trained.save_pretrained, final)
        logger.info("saved the trained aligner to %s", final)
    accelerator.wait_for_everyone()
    return final


def collate_or_none(samples: list[dict | None]) -> dict[str, torch.Tensor] | None:
    """collate_features over the readable samples (online mode returns None for a corrupt image)."""
    samples = [sample for sample in samples if sample is not None]
    return collate_features(samples) if samples else None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[0], prog="python -m trainer.train")
    try:
        final = train(cfg)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(f"trained aligner: {final}")


if __name__ == "__main__":
    main()
