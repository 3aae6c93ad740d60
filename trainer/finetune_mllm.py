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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import option, parse_config
from trainer.data import EditTriplets

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens without loss (transformers' cross-entropy ignores it)
# LoRA targets: the language model's attention and MLP projections (same names in LLaVA's Llama and
# Qwen2.5-VL's Qwen2); the vision tower and the projector stay frozen, as in the paper's fine-tuning.
LANGUAGE_MODEL_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
METRICS_NAME = "finetune_metrics.jsonl"


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

    def check(self) -> None:
        if not self.dataset or not self.out:
            raise ValueError("--dataset and --out are required")
        for name in ("lora_rank", "batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")


def base_spec(base: str, tiny_root: str | Path | None = None):
    """MLLMSpec for a known name, a known hub id (e.g. llava-hf/llava-1.5-13b-hf) or a local folder, its
    folder ready (img_core's one MLLM loader: prepared into the cache, tiny models built)."""
    from img_core.mllm.loading import resolve_mllm

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
    from img_core.errors import InvalidInputError
    from img_core.images import load_image

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


def finetune(cfg: FinetuneConfig, tiny_root: str | Path | None = None) -> Path:
    """Train LoRA adapters, merge them into the base and save the result to cfg.out; returns cfg.out."""
    from accelerate import Accelerator
    from peft import (
        LoraConfig,
        PeftModel,
        get_peft_model,
        prepare_model_for_kbit_training,
    )
    from tqdm.auto import tqdm

    from img_core.mllm import CONVERSION_RECORD
    from img_core.mllm.loading import load_mllm

    cfg.check()
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
    spec = base_spec(cfg.base, tiny_root)
    if cfg.chat_template:
        spec = dataclasses.replace(spec, chat_template=cfg.chat_template)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    critic = load_mllm(spec, device=accelerator.device, dtype=dtype, quantization=cfg.quantization)

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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA: %d trainable parameters of %d", trainable, sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    critic.model = model  # the critic now builds inputs for, and runs, the adapted model

    # 3. data order: seeded permutation per epoch, process p takes every P-th micro-batch
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    max_steps = cfg.max_steps or max(1, math.ceil(len(triplets) * cfg.epochs / per_step))

    def micro_batches():
        epoch = 0
        while True:
            order = torch.randperm(len(triplets), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            stride = rows_per_micro_batch  # an epoch's last incomplete micro-batch is dropped
            for start in range(0, len(order) - stride + 1, stride):
                rows = order[start + accelerator.process_index * cfg.batch_size :][: cfg.batch_size].tolist()
                yield [(row, cfg.seed + epoch * len(triplets) + row) for row in rows]
            epoch += 1

    # 4. the loop
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_NAME).write_text("")
    tokenizer = critic.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = micro_batches()
    progress = tqdm(total=max_steps, desc="mllm lora", disable=not accelerator.is_main_process)
    model.train()
    window, window_start = [], time.perf_counter()
    for step in range(1, max_steps + 1):
        used = 0
        for _ in range(cfg.gradient_accumulation_steps):
            examples = [read_example(critic, triplets, row, seed) for row, seed in next(batches)]
            examples = [example for example in examples if example is not None]
            # Every micro-batch enters accumulate(), also one without a readable row, so accelerate's
            # accumulation phase stays in step with `step` and the optimizer steps once per step.
            with accelerator.accumulate(model):
                if not examples:
                    continue
                loss = model(**collate(examples, pad_token_id)).loss
                if not torch.isfinite(loss):
                    logger.warning("step %d: non-finite loss, micro-batch skipped", step)
                    continue
                accelerator.backward(loss)
                used += 1
            window.append(loss.item())
        if used:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        if (step % cfg.log_every == 0 or step == max_steps) and accelerator.is_main_process:
            seen = len(window) * cfg.batch_size * accelerator.num_processes
            record = {"step": step, "answer_loss": sum(window) / max(len(window), 1), "lr": cfg.lr,
                      "samples_per_s": seen / (time.perf_counter() - window_start)}
            with open(out / METRICS_NAME, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            progress.set_postfix(answer_loss=f"{record['answer_loss']:.4g}")
            window, window_start = [], time.perf_counter()
    progress.close()

    # 5. save the adapter, merge it into an unquantized base, save the merged model
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out / "adapter")
        del model, critic
        merged = load_mllm(spec, device="cpu", dtype=getattr(torch, cfg.save_dtype), quantization="none")
        merged_model = PeftModel.from_pretrained(merged.model, out / "adapter").merge_and_unload()
        merged_model.save_pretrained(out)
        merged.processor.save_pretrained(out)
        record = {"chat_template": spec.chat_template, "image_aspect": spec.image_aspect, "base": spec.model_id,
                  "finetuned_by": "trainer.finetune_mllm", "dataset": cfg.dataset, "steps": max_steps,
                  "config": dataclasses.asdict(cfg)}
        (out / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        logger.info("saved the merged MLLM to %s", out)
    accelerator.wait_for_everyone()
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
