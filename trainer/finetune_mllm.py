"""Fine-tune an MLLM into IMG's misalignment detector on InstructPix2Pix-style triplets (REFERENCE §5).

    python -m trainer.finetune_mllm --dataset PARQUET_DIR --base llava-hf/llava-1.5-13b-hf --out DIR
    python -m trainer.finetune_mllm --dataset PARQUET_DIR --base Qwen/Qwen2.5-VL-7B-Instruct --out DIR \
        --quantization bnb-nf4

Each triplet (original image, edited prompt, edit instruction) becomes one conversation in the MLLM's
own chat template, built by img_core's `MLLMCritic` exactly as at inference:
    [system] [image tokens] "How can the image match the intended prompt: {edited prompt}?" [assistant] {edit}
    labels:  -100 ........................................................................... answer tokens + end

with the question drawn from the 100 templates by (seed, epoch, row). The loss is the language-model
cross-entropy on the answer tokens only. LoRA adapters (peft) go on the language model's linear layers;
`--quantization bnb-nf4` loads the frozen base in 4 bits (QLoRA) so LLaVA-13B fits a 24 GB GPU. After
training (1 epoch by default) the adapter is saved to DIR/adapter/, merged into an unquantized copy of the
base, and the merged model is saved to DIR with its processor and `img_studio_mllm.json` (chat template,
image aspect), so `load_mllm(DIR)` (img_core.mllm.loading) and `IMGSession(ModelOptions(mllm=DIR))` load it.

Checkpoints (trainer.loop): every --checkpoint-every steps DIR/checkpoints/step-NNNNNNNN/checkpoint.pt holds
the LoRA weights, the optimizer, the step, the RNG states and the config, in an atomic folder with a
SHA256SUMS file. `--resume` continues from the newest intact one exactly: the data order is a pure
function of (seed, micro-batch number), so the resumed run's LoRA weights equal the uninterrupted run's.
`--restart` moves an earlier run in DIR aside. A micro-batch without a readable row, or with a non-finite
loss, still runs one backward (of a zero loss on a dummy conversation), so on several processes the
gradient all-reduce never waits for a process that skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from img_core.errors import InvalidInputError
from img_core.images import load_image
from img_core.mllm import CONVERSION_RECORD
from img_core.mllm.loading import load_mllm, resolve_mllm
from trainer import loop, option, parse_config
from trainer.data import EditTriplets

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens without loss (transformers' cross-entropy ignores it)
# LoRA targets: the language model's attention and MLP projections (same names in LLaVA's Llama and
# Qwen2.5-VL's Qwen2); the vision tower and the projector stay frozen, as in the paper's fine-tuning.
LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
METRICS_NAME = "finetune_metrics.jsonl"
CHECKPOINT_KEYS = ("step", "lora", "optimizer", "rng", "config")
# Settings that change the trajectory of a run: a resume must use the values in the checkpoint.
TRAJECTORY_SETTINGS = (
    "dataset", "base", "chat_template", "quantization", "dtype", "lora_rank", "lora_alpha", "lora_dropout",
    "batch_size", "gradient_accumulation_steps", "lr", "gradient_checkpointing", "limit", "split", "seed",
)


@dataclass
class FinetuneConfig:
    dataset: str = option(
        "", "folder of InstructPix2Pix-style parquet files (original_image, edited_prompt, edit_prompt) or a hub id"
    )
    out: str = option("", "folder for the merged model (plus adapter/ and finetune_metrics.jsonl)")
    base: str = option(
        "llava-hf/llava-1.5-13b-hf", "MLLM to fine-tune: a name in img_core.mllm.KNOWN_MLLMS, its hub id, or a folder"
    )
    chat_template: str | None = option(None, "override the base's chat template (llava-v0, llava-v1, qwen2.5-vl)")
    quantization: str = option(
        "none", "base weights while training; bnb-nf4 = QLoRA", choices=["none", "bnb-nf4", "bnb-8bit"]
    )
    dtype: str | None = option(None, "compute dtype of the base (default: bfloat16 on CUDA, float32 on CPU)")
    save_dtype: str = option("bfloat16", "dtype of the merged model written to --out")
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    epochs: float = option(1.0, "passes over the data (paper: 1)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = option(1, "conversations per process per micro-batch")
    gradient_accumulation_steps: int = option(8, "micro-batches per optimizer step")
    lr: float = option(2e-4, "AdamW learning rate of the LoRA weights, constant")
    gradient_checkpointing: bool = option(False, "trade compute for activation memory (13B models)")
    limit: int | None = option(None, "use only the first N rows")
    split: str = option("train", "split of a hub dataset")
    seed: int = option(0, "seed of the data order, question choice and LoRA init")
    log_every: int = option(10, "optimizer steps between log lines")
    checkpoint_every: int = option(100, "optimizer steps between checkpoints (also at the end)")
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk")
    resume: str | None = option(
        None, "checkpoint folder to continue from; the flag alone means the newest in OUT/checkpoints", const="latest"
    )
    restart: bool = option(False, "start over: move an earlier run in OUT aside to OUT.damaged-N first")

    def check(self) -> None:
        if not self.dataset or not self.out:
            raise ValueError("--dataset and --out are required")
        for name in ("lora_rank", "batch_size", "gradient_accumulation_steps", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")


def base_spec(base: str, tiny_root: str | Path | None = None):
    """MLLMSpec for a known name, a known hub id (e.g. llava-hf/llava-1.5-13b-hf) or a local folder, its
    folder ready (img_core's one MLLM loader: prepared into the cache, tiny models built)."""

    return resolve_mllm(base, tiny_root)


def conversation(critic, image, edited_prompt: str, edit_prompt: str, seed: int) -> dict[str, torch.Tensor]:
    """Model inputs of one conversation (batch 1) with `labels` set on the answer tokens only.

    Uses the critic's own input builder, so training sees exactly the template, image processing and
    context-length handling of inference. The prompt part is the longest common prefix of the
    conversation without and with the answer."""
    # MLLMCritic.conversation_inputs is img_core's one builder of (prompt [+ answer]) inputs.
    prompt = critic.conversation_inputs(image, edited_prompt, seed, answer=None, reserve=0)["input_ids"][0]
    inputs = critic.conversation_inputs(image, edited_prompt, seed, answer=edit_prompt, reserve=0)
    full = inputs["input_ids"][0]
    shared = min(len(prompt), len(full))
    mismatch = (prompt[:shared] != full[:shared]).nonzero()
    prefix = int(mismatch[0]) if len(mismatch) else shared
    labels = full.clone()
    labels[:prefix] = IGNORE_INDEX
    return {**inputs, "labels": labels[None]}  # (1, S)


def collate(examples: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad per-token tensors (input_ids with the pad id, labels with -100, attention_mask and any
    other (1, S) tensor such as Qwen's mm_token_type_ids with 0); concatenate image tensors (LLaVA
    pixel_values (B, 3, H, W), Qwen's flattened patches and image_grid_thw) along their first dimension."""
    longest = max(e["input_ids"].shape[1] for e in examples)
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch = {}
    for key, first in examples[0].items():
        if all(e[key].dim() == 2 and e[key].shape[1] == e["input_ids"].shape[1] for e in examples):
            padded = torch.full((len(examples), longest), fill.get(key, 0), dtype=first.dtype, device=first.device)
            for row, example in enumerate(examples):
                padded[row, : example[key].shape[1]] = example[key][0]
            batch[key] = padded  # (B, S)
        else:
            batch[key] = torch.cat([e[key] for e in examples])
    return batch


def read_example(critic, triplets: EditTriplets, row: int, seed: int) -> dict[str, torch.Tensor] | None:
    try:
        triplet = triplets[row]
        image = load_image(triplet.image)
    except (ValueError, InvalidInputError) as error:
        logger.warning("row %d skipped: %s", row, error)
        return None
    if not triplet.edited_prompt.strip() or not triplet.edit_prompt.strip():
        logger.warning("row %d skipped: empty prompt or instruction", row)
        return None
    return conversation(critic, image, triplet.edited_prompt.strip(), triplet.edit_prompt.strip(), seed)


@torch.no_grad()
def answer_loss(critic, triplets: EditTriplets, rows: list[int], seed: int = 0) -> float:
    """Mean cross-entropy per answer token of `critic`'s model over `rows` (question seed = seed + row)."""
    total, tokens = 0.0, 0
    for row in rows:
        example = read_example(critic, triplets, row, seed + row)
        if example is None:
            continue
        count = int((example["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += critic.model(**example).loss.item() * count
        tokens += count
    return total / max(tokens, 1)


def load_base_critic(cfg: FinetuneConfig, device: str, dtype: torch.dtype | None, quantization: str,
                     tiny_root: str | Path | None = None):
    """The base MLLM of cfg.base as an img_core `MLLMCritic` (same processor, chat template and
    quantization as at inference). Every model load of fine-tuning goes through here."""
    spec = base_spec(cfg.base, tiny_root)
    if cfg.chat_template:
        spec = dataclasses.replace(spec, chat_template=cfg.chat_template)
    return load_mllm(spec, device=device, dtype=dtype, quantization=quantization)


def micro_batch_rows(num_rows: int, batch_size: int, process_index: int, num_processes: int, seed: int,
                     start: int = 0) -> Iterator[list[tuple[int, int]]]:
    """This process's micro-batches from micro-batch number `start` on, as [(row, question seed)]: a seeded
    permutation per epoch, cut into groups of batch_size x num_processes rows (an epoch's last incomplete
    group is dropped); process p takes rows [p*B, (p+1)*B) of each group. A pure function of the micro-batch
    number, so a resumed run reads exactly the rows the uninterrupted one would."""
    stride = batch_size * num_processes
    per_epoch = num_rows // stride
    epoch, index = divmod(start, per_epoch)
    while True:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for group in range(index, per_epoch):
            rows = order[group * stride + process_index * batch_size:][:batch_size].tolist()
            yield [(row, seed + epoch * num_rows + row) for row in rows]
        epoch, index = epoch + 1, 0


def dummy_conversation(critic) -> dict[str, torch.Tensor]:
    """A finite one-token-answer conversation on a blank image: the input of a skipped micro-batch's
    zero-loss backward (every LoRA weight takes part, so DDP's all-reduce sees all of them)."""
    blank = Image.new("RGB", (32, 32), (128, 128, 128))
    return conversation(critic, blank, "an image", "none", seed=0)


def load_finetune_checkpoint(folder: Path) -> dict:
    return loop.load_checkpoint(folder, required=CHECKPOINT_KEYS, finite=("lora",))


def finetune(cfg: FinetuneConfig, tiny_root: str | Path | None = None) -> Path:
    """Train LoRA adapters, merge them into the base and save the result to cfg.out; returns cfg.out.
    A failing run leaves no empty OUT folder."""
    cfg.check()
    with loop.output_folder(cfg.out):
        return run_finetune(cfg, tiny_root)


def run_finetune(cfg: FinetuneConfig, tiny_root: str | Path | None) -> Path:
    from accelerate import Accelerator
    from peft import (
        LoraConfig,
        PeftModel,
        get_peft_model,
        prepare_model_for_kbit_training,
    )
    from tqdm.auto import tqdm

    out = Path(cfg.out)

    # 1. data and the base model, loaded by img_core's loader (same processor, template, quantization)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    torch.manual_seed(cfg.seed)
    triplets = EditTriplets(cfg.dataset, limit=cfg.limit, split=cfg.split)
    rows_per_micro_batch = cfg.batch_size * accelerator.num_processes
    if len(triplets) < rows_per_micro_batch:
        raise ValueError(
            f"{cfg.dataset} has {len(triplets)} usable rows, fewer than one micro-batch of --batch-size "
            f"{cfg.batch_size} x {accelerator.num_processes} process(es) = {rows_per_micro_batch}; lower --batch-size "
            "or use more data"
        )
    found = loop.find_resume_point(out, cfg.resume, cfg.restart, load_finetune_checkpoint,
                                   accelerator.is_main_process, accelerator.wait_for_everyone, METRICS_NAME, logger)
    resume_dir, checkpoint = found if found is not None else (None, None)
    if checkpoint is not None:
        changed = [k for k in TRAJECTORY_SETTINGS if checkpoint["config"].get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(
                f"cannot resume {resume_dir} exactly: settings changed since the checkpoint: "
                + ", ".join(f"{k} {checkpoint['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            )
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    critic = load_base_critic(cfg, str(accelerator.device), dtype, cfg.quantization, tiny_root)
    spec = critic.spec

    # 2. LoRA on the language model
    model = critic.model
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LANGUAGE_MODEL_LINEARS)
    model = get_peft_model(model, lora)
    lora_names = [name for name, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA: %d trainable parameters of %d", trainable, sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    step = 0
    if checkpoint is not None:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name in lora_names:
                parameters[name].copy_(checkpoint["lora"][name])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        logger.info("resuming from %s at step %d", resume_dir, step)
    model, optimizer = accelerator.prepare(model, optimizer)
    critic.model = model  # the critic now builds inputs for, and runs, the adapted model
    if checkpoint is not None:
        loop.set_rng_state(checkpoint["rng"])

    # 3. data order: seeded permutation per epoch, process p takes every P-th group of rows
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    max_steps = cfg.max_steps or max(1, math.ceil(len(triplets) * cfg.epochs / per_step))
    batches = micro_batch_rows(len(triplets), cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                               cfg.seed, start=step * cfg.gradient_accumulation_steps)

    def save_checkpoint() -> None:
        unwrapped = dict(accelerator.unwrap_model(model).named_parameters())
        state = {"step": step, "lora": {name: unwrapped[name].detach().cpu().clone() for name in lora_names},
                 "optimizer": optimizer.state_dict(), "rng": loop.rng_state(), "config": dataclasses.asdict(cfg),
                 "max_steps": max_steps, "log_window": window.checkpoint_state(accelerator)}
        if accelerator.is_main_process:
            loop.save_checkpoint(out, state, finite=("lora",))
            loop.prune_checkpoints(out, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    # 4. the loop: one iteration = one optimizer step over gradient_accumulation_steps micro-batches
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_NAME).touch()
        loop.rewind_metrics(out / METRICS_NAME, step, logger)  # drop lines a killed run logged after its last checkpoint
    tokenizer = critic.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dummy = {k: v.to(accelerator.device) for k, v in dummy_conversation(critic).items()}
    progress = tqdm(total=max_steps, initial=step, desc="mllm lora", disable=not accelerator.is_main_process)
    model.train()
    window = loop.Tally(("answer_loss", "micro_batches"), accelerator.device)  # sums since the last log line
    if checkpoint is not None:
        window.restore(checkpoint["log_window"], accelerator.is_main_process)
    window_start = time.perf_counter()
    while step < max_steps:
        tally = loop.Tally(("used", "unreadable", "nonfinite"), accelerator.device)
        for _ in range(cfg.gradient_accumulation_steps):
            examples = [read_example(critic, triplets, row, seed) for row, seed in next(batches)]
            examples = [example for example in examples if example is not None]
            compute_loss = None
            if examples:
                batch = {k: v.to(accelerator.device) for k, v in collate(examples, pad_token_id).items()}

                def compute_loss(batch=batch) -> dict[str, torch.Tensor]:
                    return {"loss": model(**batch).loss}

            stats, reason = loop.accumulation_micro_step(accelerator, model, compute_loss,
                                                         lambda: model(**dummy).loss * 0.0)
            if reason is None:
                tally["used"] += 1
                window["answer_loss"] += stats["loss"]
                window["micro_batches"] += 1
            else:
                tally[reason] += 1
                logger.warning("step %d: micro-batch skipped (%s)", step + 1,
                               "non-finite loss" if reason == "nonfinite" else "no readable row")
        if tally.reduce(accelerator)["used"] > 0:  # the same decision on every process
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        if step % cfg.log_every == 0 or step == max_steps:
            sums = window.reduce(accelerator)
            count = sums["micro_batches"]
            record = {"step": step, "answer_loss": sums["answer_loss"] / count if count else None, "lr": cfg.lr,
                      "samples_per_s": count * cfg.batch_size / (time.perf_counter() - window_start)}
            if accelerator.is_main_process:
                loop.append_metrics(out / METRICS_NAME, record)
                progress.set_postfix(answer_loss=f"{record['answer_loss']:.4g}" if count else "skipped")
            window.values.zero_()
            window_start = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == max_steps:
            save_checkpoint()
    progress.close()

    # 5. save the adapter, merge it into an unquantized base, save the merged model
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        loop.atomic_save_dir(accelerator.unwrap_model(model).save_pretrained, out / "adapter")
        del model, critic
        merged = load_base_critic(cfg, "cpu", getattr(torch, cfg.save_dtype), "none", tiny_root)
        merged_model = PeftModel.from_pretrained(merged.model, out / "adapter").merge_and_unload()
        merged_model.save_pretrained(out)
        merged.processor.save_pretrained(out)
        record = {"chat_template": spec.chat_template, "image_aspect": spec.image_aspect, "base": spec.model_id,
                  "finetuned_by": "trainer.finetune_mllm", "dataset": cfg.dataset, "steps": max_steps,
                  "config": dataclasses.asdict(cfg)}
        (out / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        logger.info("saved the merged MLLM to %s", out)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the gloo/NCCL group ends here: left to interpreter exit it can abort a rank (SIGABRT)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(FinetuneConfig, argv, description=__doc__.split("\n\n")[0], prog="python -m trainer.finetune_mllm")
    try:
        out = finetune(cfg)
    except (ValueError, FileNotFoundError, ImportError) as error:
        sys.exit(f"error: {error}")
    print(f"fine-tuned MLLM: {out} (load it with --mllm {out})")


if __name__ == "__main__":
    main()
