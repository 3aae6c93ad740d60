"""Train the Implicit Aligner with the Iteratively Updated Preference Objective (REFERENCE §6).

    python -m trainer.train --features STORE --out RUN
    accelerate launch -m trainer.train --features STORE --out RUN --batch-size 8
    python -m trainer.train --online --dataset PARQUET_DIR --preset sdxl --out RUN
    python -m trainer.train --features STORE --out RUN --resume          # continue from the newest checkpoint

RUN/ gets config.json (this run's settings), metrics.jsonl (one JSON object per log or validation
step), checkpoints/step-NNNNNNNN/checkpoint.pt and final/ (an aligner folder that
`ImplicitAligner.from_pretrained` and the app load, with the store's metadata and the step count). Both
are written atomically with a SHA256SUMS file and verified when loaded (trainer.loop).

Damaged data is never used silently: a micro-batch whose inputs or loss are not finite (or, online,
whose images are all unreadable) is skipped and counted in metrics.jsonl (`skipped_nonfinite`,
`skipped_unreadable`), and the run stops with an error after --max-skipped-in-a-row of them in a row;
weights that are not finite are never saved. `--resume` verifies each checkpoint's sha256 and falls
back, with a warning, to the newest checkpoint that is intact (damaged ones are renamed damaged-step-*);
when none is intact, every later --resume refuses until `--restart` moves the run aside (RUN.damaged-N).
A damaged metrics.jsonl line is dropped with a warning.

Sizes are checked before any work: a --batch-size larger than the training samples per process is
refused, and so is a micro-batch whose estimated memory (from the store's dims) exceeds the free memory.

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from img_core.aligner import (
    FLUX_FEATURES,
    SDXL_FEATURES,
    AlignerConfig,
    ImplicitAligner,
)
from img_core.errors import CorruptFileError
from img_core.integrity import (
    CHECKSUMS_NAME,
    check_finite,
    has_checksums,
    nonfinite_tensors,
    verify_folder,
)
from img_core.settings import MLLM_GUIDANCE_MODES
from trainer import loop, option, parse_config
from trainer.extract import OnlineTriplets
from trainer.loop import checkpoint_dirs  # noqa: F401 - re-exported: benchmarks/bench_reliability.py imports it here
from trainer.objective import REDUCTIONS, ReferenceUpdater, iupo_loss, squared_distance
from trainer.store import FeatureStore, collate_features

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("step", "samples_seen", "aligner", "reference", "optimizer", "config")
METRICS_NAME = "metrics.jsonl"
# Share of the free memory one micro-batch may take (the rest: weights, optimizer state, the allocator).
MICRO_BATCH_MEMORY_SHARE = 0.5
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
    restart: bool = option(False, "start over: move an earlier run in OUT (e.g. one whose checkpoints are all "
                           "damaged) aside to OUT.damaged-N first")

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
        if has_checksums(path):  # a RUN/final written by this trainer
            verify_folder(path)
        else:
            logger.warning("--init-from %s has no %s (not written by this trainer): loading it unverified", path,
                           CHECKSUMS_NAME)
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
    sums = loop.Tally(("mse", "mse_identity", "wins", "count", "skipped"), accelerator.device)
    for start in range(0, len(own), batch_size):
        read = [source[i] for i in own[start : start + batch_size]]
        samples = [s for s in read if s is not None and not nonfinite_tensors(s)]
        sums["skipped"] += len(read) - len(samples)
        if not samples:
            continue
        batch = to_device(collate_features(samples), accelerator.device)
        with accelerator.autocast():
            aligned = aligner(batch["image_l"], batch["guidance"], batch["guidance_mask"])
        mse = squared_distance(batch["image_w"], aligned)  # (B,)
        mse_identity = squared_distance(batch["image_w"], batch["image_l"])  # (B,)
        sums["mse"] += mse.sum()
        sums["mse_identity"] += mse_identity.sum()
        sums["wins"] += (mse < mse_identity).sum()
        sums["count"] += len(samples)
    totals = sums.reduce(accelerator)
    count = max(totals["count"], 1.0)
    return {"val_mse": totals["mse"] / count, "val_mse_identity": totals["mse_identity"] / count,
            "val_win_rate": totals["wins"] / count, "val_skipped": int(totals["skipped"])}


def load_checkpoint(folder: Path) -> dict:
    """The training state of checkpoint `folder`, verified (SHA256SUMS) and with finite weights;
    CorruptFileError naming the file and the damage otherwise."""
    return loop.load_checkpoint(folder, required=CHECKPOINT_KEYS, finite=("aligner", "reference"))


def open_source(cfg: TrainConfig, device: torch.device):
    if not cfg.online:
        return FeatureStore(cfg.features)

    return OnlineTriplets(cfg.dataset, cfg.preset, cfg.guidance_mode, device=cfg.device or str(device), seed=cfg.seed,
                          questions=cfg.questions)


# ----------------------------------------------------------------------------------------- training


def micro_batch_bytes(cfg: TrainConfig, manifest: dict, guidance_tokens: int) -> int:
    """Estimated memory of one micro-batch of --batch-size samples: the float32 inputs on the device plus
    the activations the aligner keeps for its backward (per block: the key/value sequence, queries,
    attention probabilities and the feed-forward), doubled for the backward's own temporaries and the
    reference aligner's forward. An estimate: it is meant to refuse sizes that cannot fit, not to plan."""
    image_tokens, width = manifest["image_tokens"], manifest["image_dim"]
    sequence = image_tokens + guidance_tokens
    inner = cfg.heads * cfg.dim_head
    inputs = 2 * image_tokens * width + guidance_tokens * manifest["guidance_dim"]
    per_block = (3 * sequence * width + image_tokens * inner + 2 * sequence * inner + cfg.heads * image_tokens * sequence
                 + 2 * image_tokens * width * cfg.ff_mult + image_tokens * width)
    floats = inputs + guidance_tokens * width + 2 * cfg.depth * per_block
    return 2 * floats * 4 * cfg.batch_size


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on `device` can use: free GPU memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # installed with accelerate; only the CPU path needs it

    return psutil.virtual_memory().available


def check_sizes(cfg: TrainConfig, source, train_samples: int, num_processes: int, device: torch.device) -> None:
    """Refuse a --batch-size the data or the memory cannot hold, before any work starts."""
    per_process = train_samples // num_processes
    if cfg.batch_size > per_process:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is larger than the {train_samples} training samples of "
            f"{cfg.features or cfg.dataset} split over {num_processes} process(es): use --batch-size {max(per_process, 1)} "
            "or less (and --gradient-accumulation-steps for larger steps)"
        )
    guidance_tokens = getattr(source, "max_guidance_tokens", None)  # a store knows it; --online does not
    if guidance_tokens is None:
        return
    needed, free = micro_batch_bytes(cfg, source.manifest, guidance_tokens), free_memory_bytes(device)
    if needed > MICRO_BATCH_MEMORY_SHARE * free:
        fitting = int(cfg.batch_size * MICRO_BATCH_MEMORY_SHARE * free / needed)
        if fitting < 1:
            raise ValueError(
                f"one sample needs about {needed / cfg.batch_size / 2**30:.1f} GiB on {device.type} with --depth "
                f"{cfg.depth} --heads {cfg.heads} --dim-head {cfg.dim_head}, {free / 2**30:.1f} GiB is free: use a "
                "smaller aligner or a device with more memory"
            )
        raise ValueError(
            f"--batch-size {cfg.batch_size} needs about {needed / 2**30:.1f} GiB per micro-batch on {device.type}, "
            f"{free / 2**30:.1f} GiB is free: use --batch-size {fitting} or less with --gradient-accumulation-steps "
            f"{-(-cfg.batch_size // fitting) * cfg.gradient_accumulation_steps} for the same samples per step"
        )


def train(cfg: TrainConfig) -> Path:
    """Run (or continue) training; returns RUN/final. A failing run leaves no empty OUT folder."""
    cfg.check()
    with loop.output_folder(cfg.out):
        return run_training(cfg)


def run_training(cfg: TrainConfig) -> Path:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(cfg.out)

    # 1. accelerator, data, sizes
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    source = open_source(cfg, accelerator.device)
    train_indices, val_indices = split_indices(len(source), cfg.val_samples, cfg.seed)
    check_sizes(cfg, source, len(train_indices), accelerator.num_processes, accelerator.device)

    # 2. aligner, reference aligner (starts as a copy: a fresh aligner is the identity), optimizer
    aligner = build_aligner(cfg, source.manifest)
    reference = copy.deepcopy(aligner).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    updater = ReferenceUpdater(k=cfg.ref_update_k)
    step, samples_seen = 0, 0

    # 3. resume (or refuse to overwrite an earlier run)
    found = loop.find_resume_point(out, cfg.resume, cfg.restart, load_checkpoint, accelerator.is_main_process,
                                   accelerator.wait_for_everyone, METRICS_NAME, logger)
    resume_dir, checkpoint = found if found is not None else (None, None)
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
        loop.set_rng_state(checkpoint["rng"])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        loop.prune_checkpoints(out, cfg.keep_checkpoints)  # --keep-checkpoints may be lower than the last run's
        loop.rewind_metrics(out / METRICS_NAME, step, logger)  # drop lines a killed run logged after its last checkpoint

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
            "rng": loop.rng_state(),
            "skipped": dict(skipped),
            "log_window": window.checkpoint_state(accelerator),
            "config": dataclasses.asdict(cfg),
            "aligner_config": accelerator.unwrap_model(aligner).config.to_dict(),
        }
        if accelerator.is_main_process:
            loop.save_checkpoint(out, state, finite=("aligner", "reference"))
            loop.prune_checkpoints(out, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    def validate() -> None:
        if not val_indices:
            return
        aligner.eval()
        metrics = evaluate(accelerator.unwrap_model(aligner), source, val_indices, cfg.batch_size, accelerator)
        aligner.train()
        if accelerator.is_main_process:
            loop.append_metrics(out / METRICS_NAME, {"step": step, **metrics})
            progress.write(
                f"step {step}: val_mse {metrics['val_mse']:.4g} (identity {metrics['val_mse_identity']:.4g})"
            )

    # 4. the loop: one iteration = one optimizer step over gradient_accumulation_steps micro-batches
    progress = tqdm(total=cfg.max_steps, initial=step, desc="aligner", disable=not accelerator.is_main_process)
    logged = ("loss", "base", "pref", "win_rate")
    window = loop.Tally((*logged, "micro_batches"), accelerator.device)  # sums over the log window
    if checkpoint is not None and "log_window" in checkpoint:
        window.restore(checkpoint["log_window"], accelerator.is_main_process)
    window_start, window_steps = time.perf_counter(), 0
    skipped_in_a_row = 0
    dummy_inputs = dummy_batch(source.manifest, accelerator.device)
    aligner.train()
    while step < cfg.max_steps:
        # d(c_w, f), d(c_w, f_ref) summed over the used micro-batches; micro-batches used and skipped;
        # processes that reached --max-skipped-in-a-row
        tally = loop.Tally(("dist_pred", "dist_ref", "used", "nonfinite", "unreadable", "stalled"), accelerator.device)
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            samples_seen += cfg.batch_size * accelerator.num_processes
            compute_loss = None  # every image unreadable (online mode only)
            if batch is not None:
                batch = to_device(batch, accelerator.device)

                def compute_loss(batch=batch) -> dict[str, torch.Tensor]:
                    if nonfinite_tensors(batch):
                        return {"loss": batch["image_l"].new_tensor(float("nan"))}
                    with accelerator.autocast():
                        pred = aligner(batch["image_l"], batch["guidance"], batch["guidance_mask"])  # (B, Si, D)
                        with torch.no_grad():
                            ref = reference(batch["image_l"], batch["guidance"], batch["guidance_mask"])  # (B, Si, D)
                    loss, stats = iupo_loss(pred, ref, batch["image_w"], batch["image_l"], lam=cfg.lam,
                                            reduction=cfg.reduction)
                    return {"loss": loss, **stats}

            stats, reason = loop.accumulation_micro_step(accelerator, aligner, compute_loss,
                                                         lambda: zero_loss(aligner, dummy_inputs))
            if reason is None:
                for name in ("dist_pred", "dist_ref"):
                    tally[name] += stats[name]
                tally["used"] += 1
                for name in logged:
                    window[name] += stats[name]
                window["micro_batches"] += 1
                skipped_in_a_row = 0
            else:
                tally[reason] += 1
                skipped_in_a_row += 1
                logger.warning("step %d: micro-batch skipped (%s)", step + 1,
                               "non-finite inputs or loss" if reason == "nonfinite" else "no readable image")
        tally["stalled"] = float(skipped_in_a_row >= cfg.max_skipped_in_a_row)
        totals = tally.reduce(accelerator)
        skipped["nonfinite"] += int(totals["nonfinite"])
        skipped["unreadable"] += int(totals["unreadable"])
        if totals["stalled"] > 0:
            raise CorruptFileError(
                f"{cfg.max_skipped_in_a_row} micro-batches in a row were skipped at step {step + 1} "
                f"({skipped['nonfinite']} non-finite, {skipped['unreadable']} unreadable so far): the data "
                f"({cfg.features or cfg.dataset}) is damaged or the loss diverged (try a lower --lr); nothing of "
                "this step was saved, the last checkpoint is intact"
            )
        if totals["used"] > 0:  # at least one micro-batch of some process was used
            grads = {name: p.grad for name, p in aligner.named_parameters() if p.grad is not None}
            if accelerator.scaler is None and nonfinite_tensors(grads):  # fp16: the grad scaler skips it
                skipped["nonfinite"] += 1
                logger.warning("step %d: non-finite gradients, optimizer step skipped", step + 1)
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        progress.update(1)

        # reference update: "closer" is decided on the step's summed distances over all processes
        if updater.step(totals["dist_pred"] < totals["dist_ref"]):
            reference.load_state_dict(accelerator.unwrap_model(aligner).state_dict())

        if step % cfg.log_every == 0:  # means over the window's micro-batches of all processes
            sums = window.reduce(accelerator)
            count = sums["micro_batches"]
            means = {k: sums[k] / count if count else None for k in logged}  # None: all skipped
            record = {"step": step, **means,
                      "ref_updates": updater.updates, "lr": optimizer.param_groups[0]["lr"],
                      "skipped_nonfinite": skipped["nonfinite"], "skipped_unreadable": skipped["unreadable"],
                      "samples_per_s": window_steps * samples_per_step / (time.perf_counter() - window_start)}
            if accelerator.is_main_process:
                loop.append_metrics(out / METRICS_NAME, record)
                progress.set_postfix(loss=f"{record['loss']:.4g}" if count else "skipped",
                                     ref_updates=updater.updates)
            window.values.zero_()
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
        loop.atomic_save_dir(trained.save_pretrained, final)
        logger.info("saved the trained aligner to %s", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the gloo/NCCL group ends here: left to interpreter exit it can abort a rank (SIGABRT)
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
