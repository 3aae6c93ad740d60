"""Train the Implicit Aligner with the Iteratively Updated Preference Objective (REFERENCE §6).

    python -m trainer.train --features STORE --out RUN
    accelerate launch -m trainer.train --features STORE --out RUN --batch-size 8
    python -m trainer.train --online --dataset PARQUET_DIR --preset sdxl --out RUN
    python -m trainer.train --features STORE --out RUN --resume          # continue from the newest checkpoint

RUN/ gets config.json (this run's settings), metrics.jsonl (one JSON object per log or validation
step), checkpoints/step-NNNNNNNN/checkpoint.pt (written atomically, with a checkpoint.pt.sha256 sidecar)
and final/ (an aligner folder that `ImplicitAligner.from_pretrained` and the app load, with the store's
metadata and the step count).

Damaged data is never used silently: a micro-batch whose inputs or loss are not finite (or, online,
whose images are all unreadable) is skipped and counted in metrics.jsonl (`skipped_nonfinite`,
`skipped_unreadable`), and the run stops with an error after --max-skipped-in-a-row of them in a row;
weights that are not finite are never saved. `--resume` verifies each checkpoint's sha256 and falls
back, with a warning, to the newest checkpoint that is intact (damaged ones are renamed damaged-step-*).

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

from img_core.errors import CorruptFileError
from img_core.integrity import (
    check_finite,
    nonfinite_tensors,
    verify_checksum,
    write_checksum,
)
from img_core.settings import MLLM_GUIDANCE_MODES
from trainer import option, parse_config
from trainer.objective import REDUCTIONS, ReferenceUpdater, iupo_loss, squared_distance
from trainer.store import FeatureStore, collate_features

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# Settings that change the trajectory of a run: a resume must use the values in the checkpoint.
TRAJECTORY_SETTINGS = (
    "features", "online", "dataset", "preset", "guidance_mode", "questions", "init_from", "depth", "heads", "dim_head",
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
    guidance_mode: str = option("question", "--online: MLLM guidance mode", choices=list(MLLM_GUIDANCE_MODES))
    questions: str | None = option(None, "--online: question source (ours, release or a JSON file; default: the preset's)")
    device: str | None = option(None, "--online: device for the preset's models (default: the accelerator's)")
    val_samples: int = option(500, "held-out samples for validation (0 = none; the paper's ablations use 500 prompts)")
    num_workers: int = option(0, "DataLoader worker processes reading the store")
    verify_store: bool = option(True, "check every shard against the sha256 in the store's manifest before training")
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
    max_skipped_in_a_row: int = option(
        20, "stop with an error after this many micro-batches in a row were skipped (non-finite inputs or loss, "
        "or online: no readable image)"
    )
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
                     "checkpoint_every", "keep_checkpoints", "ref_update_k", "max_skipped_in_a_row"):
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
    from img_core.aligner import (
        FLUX_FEATURES,
        SDXL_FEATURES,
        AlignerConfig,
        ImplicitAligner,
    )

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
    """Held-out MSE to the winner: one aligner pass vs the identity (the loser's own features). Samples
    that are unreadable or not finite are left out (and counted in `val_skipped`)."""
    own = indices[accelerator.process_index :: accelerator.num_processes]
    sums = torch.zeros(5, device=accelerator.device)  # aligner MSE, identity MSE, aligner wins, count, skipped
    for start in range(0, len(own), batch_size):
        read = [source[i] for i in own[start : start + batch_size]]
        samples = [s for s in read if s is not None and not nonfinite_tensors(s)]
        sums[4] += len(read) - len(samples)
        if not samples:
            continue
        batch = to_device(collate_features(samples), accelerator.device)
        with accelerator.autocast():
            aligned = aligner(batch["image_l"], batch["guidance"], batch["guidance_mask"])
        mse = squared_distance(batch["image_w"], aligned)  # (B,)
        mse_identity = squared_distance(batch["image_w"], batch["image_l"])  # (B,)
        wins = (mse < mse_identity).float()
        sums[:4] += torch.stack([mse.sum(), mse_identity.sum(), wins.sum(), wins.new_tensor(len(wins))])
    sums = accelerator.reduce(sums, reduction="sum")
    count = max(sums[3].item(), 1.0)
    return {"val_mse": sums[0].item() / count, "val_mse_identity": sums[1].item() / count,
            "val_win_rate": sums[2].item() / count, "val_skipped": int(sums[4].item())}


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


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints."""
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(folder: Path) -> dict:
    """The training state in folder/checkpoint.pt, after checking its sha256 sidecar and that its weights
    are finite; CorruptFileError (naming the file and the damage) otherwise."""
    path = folder / CHECKPOINT_NAME
    if not verify_checksum(path):
        logger.warning("%s has no sha256 sidecar (written by an older trainer): loading it unverified", path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch reports damaged zip/pickle data as many error types
        raise CorruptFileError(f"{path} cannot be read ({type(error).__name__}: {error})") from error
    missing = [key for key in ("step", "samples_seen", "aligner", "reference", "optimizer", "config")
               if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CorruptFileError(f"{path} is not a training checkpoint: it lacks {missing}")
    check_finite(checkpoint["aligner"], f"{path} (aligner)")
    check_finite(checkpoint["reference"], f"{path} (reference)")
    return checkpoint


def newest_good_checkpoint(out: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in OUT/checkpoints that loads intact, or None when there is none. Damaged
    ones are renamed damaged-step-* (kept for inspection, no longer counted) with a warning."""
    folders = checkpoint_dirs(out)
    damaged = []
    for folder in reversed(folders):
        try:
            return folder, load_checkpoint(folder)
        except CorruptFileError as error:
            logger.warning("%s; falling back to the previous checkpoint", error)
            aside = folder.with_name("damaged-" + folder.name)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            damaged.append(aside.name)
    if damaged:
        raise CorruptFileError(
            f"every checkpoint in {out / 'checkpoints'} is damaged ({', '.join(damaged)}, renamed): pass --resume "
            "with a good checkpoint folder, or another --out to start over"
        )
    return None


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

    return OnlineTriplets(cfg.dataset, cfg.preset, cfg.guidance_mode, device=cfg.device or str(device), seed=cfg.seed,
                          questions=cfg.questions)


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
    resume_dir, checkpoint = None, None
    if cfg.resume == "latest":
        if accelerator.is_main_process:  # verifies, and renames damaged checkpoints aside
            found = newest_good_checkpoint(out)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:  # finds what the main process settled on
            found = newest_good_checkpoint(out)
        if found is None:
            logger.info("no checkpoint in %s: starting from scratch", out / "checkpoints")
        else:
            resume_dir, checkpoint = found
    elif cfg.resume:
        resume_dir = Path(cfg.resume)
        if not (resume_dir / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"--resume {resume_dir} has no {CHECKPOINT_NAME}")
        checkpoint = load_checkpoint(resume_dir)
    elif checkpoint_dirs(out):
        raise ValueError(f"{out} already has checkpoints: pass --resume to continue it, or choose another --out")
    skipped = {"nonfinite": 0, "unreadable": 0}  # micro-batches skipped so far (all processes)
    if checkpoint is not None:
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
        skipped.update(checkpoint.get("skipped", {}))
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
        prune_checkpoints(out, cfg.keep_checkpoints)  # --keep-checkpoints may be lower than the last run's
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
            "skipped": dict(skipped),
            "config": dataclasses.asdict(cfg),
            "aligner_config": accelerator.unwrap_model(aligner).config.to_dict(),
        }
        if accelerator.is_main_process:
            folder = out / "checkpoints" / f"step-{step:08d}"
            check_finite(state["aligner"], f"the aligner at step {step} (not saved to {folder})")
            check_finite(state["reference"], f"the reference aligner at step {step} (not saved to {folder})")

            def write(tmp: Path) -> None:
                torch.save(state, tmp / CHECKPOINT_NAME)
                write_checksum(tmp / CHECKPOINT_NAME)

            atomic_save_dir(write, folder)
            prune_checkpoints(out, cfg.keep_checkpoints)
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
    skipped_in_a_row = 0
    dummy_inputs = dummy_batch(source.manifest, accelerator.device)
    aligner.train()
    while step < cfg.max_steps:
        # step_sums: d(c_w, f), d(c_w, f_ref) summed over used micro-batches; micro-batches used, skipped
        # as non-finite, skipped as unreadable; processes that reached max_skipped_in_a_row
        step_sums = torch.zeros(6, device=accelerator.device)
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            samples_seen += cfg.batch_size * accelerator.num_processes
            reason = "unreadable" if batch is None else None  # every image unreadable (online mode only)
            if batch is not None:
                batch = to_device(batch, accelerator.device)
                if nonfinite_tensors(batch):
                    reason = "nonfinite"
            # Every micro-batch goes through accumulate() and one backward, also a skipped one (a zero
            # loss on finite dummy inputs), so accelerate's accumulation phase and DDP's gradient
            # all-reduce stay in step with the loop on every process.
            with accelerator.accumulate(aligner):
                if reason is None:
                    with accelerator.autocast():
                        pred = aligner(batch["image_l"], batch["guidance"], batch["guidance_mask"])  # (B, Si, D)
                        with torch.no_grad():
                            ref = reference(batch["image_l"], batch["guidance"], batch["guidance_mask"])  # (B, Si, D)
                    loss, stats = iupo_loss(
                        pred, ref, batch["image_w"], batch["image_l"], lam=cfg.lam, reduction=cfg.reduction
                    )
                    if not torch.isfinite(loss):
                        reason = "nonfinite"
                if reason is None:
                    accelerator.backward(loss)
                    step_sums[:3] += torch.stack([stats["dist_pred"], stats["dist_ref"], torch.ones_like(loss)])
                    window += torch.stack([loss.detach(), *(stats[key] for key in logged[1:]), torch.ones_like(loss)])
                    skipped_in_a_row = 0
                else:
                    accelerator.backward(zero_loss(aligner, dummy_inputs))
                    step_sums[3 if reason == "nonfinite" else 4] += 1
                    skipped_in_a_row += 1
                    logger.warning("step %d: micro-batch skipped (%s)", step + 1,
                                   "non-finite inputs or loss" if reason == "nonfinite" else "no readable image")
        step_sums[5] = float(skipped_in_a_row >= cfg.max_skipped_in_a_row)
        step_sums = accelerator.reduce(step_sums, reduction="sum")
        skipped["nonfinite"] += int(step_sums[3])
        skipped["unreadable"] += int(step_sums[4])
        if step_sums[5] > 0:
            raise CorruptFileError(
                f"{cfg.max_skipped_in_a_row} micro-batches in a row were skipped at step {step + 1} "
                f"({skipped['nonfinite']} non-finite, {skipped['unreadable']} unreadable so far): the data "
                f"({cfg.features or cfg.dataset}) is damaged or the loss diverged (try a lower --lr); nothing of "
                "this step was saved, the last checkpoint is intact"
            )
        if step_sums[2] > 0:  # at least one micro-batch of some process was used
            grads = {name: p.grad for name, p in aligner.named_parameters() if p.grad is not None}
            if accelerator.scaler is None and nonfinite_tensors(grads):  # fp16: the grad scaler skips it
                skipped["nonfinite"] += 1
                logger.warning("step %d: non-finite gradients, optimizer step skipped", step + 1)
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        distances = step_sums[:2]
        step += 1
        window_steps += 1
        progress.update(1)

        # reference update: "closer" is decided on the step's mean distances over all processes
        if updater.step(bool(distances[0] < distances[1])):
            reference.load_state_dict(accelerator.unwrap_model(aligner).state_dict())

        if step % cfg.log_every == 0:  # means over the window's micro-batches of all processes
            sums = accelerator.reduce(window, reduction="sum").tolist()
            means = {k: v / sums[-1] if sums[-1] else None for k, v in zip(logged, sums)}  # None: all skipped
            record = {"step": step, **means,
                      "ref_updates": updater.updates, "lr": optimizer.param_groups[0]["lr"],
                      "skipped_nonfinite": skipped["nonfinite"], "skipped_unreadable": skipped["unreadable"],
                      "samples_per_s": window_steps * samples_per_step / (time.perf_counter() - window_start)}
            if accelerator.is_main_process:
                append_metrics(out, record)
                progress.set_postfix(loss=f"{record['loss']:.4g}" if sums[-1] else "skipped",
                                     ref_updates=updater.updates)
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
        check_finite(trained.state_dict(), f"the trained aligner (not saved to {final})")
        trained.config = dataclasses.replace(trained.config, training_steps=step)
        atomic_save_dir(trained.save_pretrained, final)
        logger.info("saved the trained aligner to %s", final)
    accelerator.wait_for_everyone()
    return final


def dummy_batch(manifest: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finite all-zero aligner inputs of the data's widths: (1, Si, D) image, (1, 1, Dg) guidance, mask."""
    image = torch.zeros(1, manifest["image_tokens"], manifest["image_dim"], device=device)
    guidance = torch.zeros(1, 1, manifest["guidance_dim"], device=device)
    return image, guidance, torch.ones(1, 1, dtype=torch.bool, device=device)


def zero_loss(aligner, dummy_inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A loss that is exactly 0 with all-zero gradients, from a forward pass on finite inputs (the
    backward of a skipped micro-batch; a NaN loss times 0 would still give NaN gradients)."""
    return aligner(*dummy_inputs).sum() * 0.0


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
