"""LoRA / QLoRA fine-tuning of the tiny MLLMs on a tiny InstructPix2Pix-style parquet; the merged result
loads with img_core's MLLM loader and yields guidance."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import png_bytes as shared_png_bytes

from img_core.images import load_image
from img_core.mllm import KNOWN_MLLMS, MLLMCritic, resolve_spec
from trainer.data import EditTriplets
from trainer.finetune_mllm import (
    FinetuneConfig,
    answer_loss,
    base_spec,
    conversation,
    finetune,
)

COLOURS = ["red", "blue", "green", "yellow"]


pytestmark = pytest.mark.usefixtures("one_thread")


def png_bytes(seed: int) -> bytes:
    return shared_png_bytes(seed, 40, 40)


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """Four triplets, images stored as datasets-style {"bytes", "path"} structs."""
    folder = tmp_path_factory.mktemp("ip2p")
    table = pa.table({
        "original_image": pa.array([{"bytes": png_bytes(i), "path": None} for i in range(len(COLOURS))]),
        "edited_prompt": [f"a photo of a {colour} house" for colour in COLOURS],
        "edit_prompt": [f"make the house {colour}" for colour in COLOURS],
    })
    pq.write_table(table, folder / "train.parquet")
    return folder


def test_labels_cover_only_the_answer(edits, tiny_root):
    critic = MLLMCritic.load(base_spec("tiny-llava"), device="cpu")
    example = conversation(critic, load_image(png_bytes(0)), "a photo of a red house", "make the house red", seed=3)
    answer_ids = example["input_ids"][0][example["labels"][0] != -100]
    # llava-v0 answers end with the "###" separator, which the model must learn to emit
    assert critic.tokenizer.decode(answer_ids) == "make the house red###"
    question = critic.question_for("a photo of a red house", 3)
    assert question in critic.tokenizer.decode(example["input_ids"][0])


def test_base_accepts_hub_ids_of_known_models():
    spec = base_spec("llava-hf/llava-1.5-13b-hf")
    assert spec == KNOWN_MLLMS["llava-1.5-13b"]
    assert base_spec("Qwen/Qwen2.5-VL-7B-Instruct").family == "qwen2_5_vl"


def test_lora_lowers_the_answer_loss_and_the_merged_llava_loads(edits, tiny_root, tmp_path):
    triplets = EditTriplets(edits)
    base = MLLMCritic.load(base_spec("tiny-llava"), device="cpu")
    rows = list(range(len(triplets)))
    loss_before = answer_loss(base, triplets, rows)

    out = finetune(FinetuneConfig(dataset=str(edits), base="tiny-llava", out=str(tmp_path / "llava"), epochs=20,
                                  batch_size=4, gradient_accumulation_steps=1, lr=5e-3, lora_rank=8,
                                  lora_dropout=0.0, save_dtype="float32", log_every=10))
    records = [json.loads(line) for line in (out / "finetune_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert records[-1]["answer_loss"] < records[0]["answer_loss"]

    spec = resolve_spec(str(out))  # a local folder: template and aspect come from img_studio_mllm.json
    assert (spec.family, spec.chat_template, spec.image_aspect) == ("llava", "llava-v0", "pad")
    tuned = MLLMCritic.load(spec, device="cpu")
    loss_after = answer_loss(tuned, triplets, rows)
    # random tiny models start at ~ln(vocab) = 5.9 nats; a frozen lm_head bounds how low LoRA can go
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)  # measured 5.88 -> 4.95

    image = load_image(png_bytes(0))
    guidance = tuned.guidance(image, "a photo of a red house", seed=0)
    assert guidance.shape[0] == 1 and guidance.shape[2] == 64 and torch.isfinite(guidance).all()
    assert not torch.allclose(guidance, base.guidance(image, "a photo of a red house", seed=0))
    assert isinstance(tuned.critique(image, "a photo of a red house", max_new_tokens=6), str)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "language_model" in adapter["target_modules"]


def test_qlora_on_qwen_trains_merges_and_loads(edits, tiny_root, tmp_path):
    triplets = EditTriplets(edits)
    rows = list(range(len(triplets)))
    loss_before = answer_loss(MLLMCritic.load(base_spec("tiny-qwen"), device="cpu"), triplets, rows)
    out = finetune(FinetuneConfig(dataset=str(edits), base="tiny-qwen", out=str(tmp_path / "qwen"), epochs=12,
                                  batch_size=2, gradient_accumulation_steps=2, lr=5e-3, lora_rank=8,
                                  lora_dropout=0.0, quantization="bnb-nf4", save_dtype="float32"))
    record = json.loads((out / "img_studio_mllm.json").read_text())
    assert record["chat_template"] == "qwen2.5-vl" and record["config"]["quantization"] == "bnb-nf4"
    tuned = MLLMCritic.load(resolve_spec(str(out)), device="cpu")
    assert tuned.spec.family == "qwen2_5_vl"
    loss_after = answer_loss(tuned, triplets, rows)
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)  # measured 5.55 -> 4.68
    guidance = tuned.guidance(load_image(png_bytes(1)), "a photo of a blue house", seed=0)
    assert guidance.shape[0] == 1 and guidance.shape[2] == 64 and torch.isfinite(guidance).all()


def test_fewer_rows_than_one_micro_batch_is_a_clear_error(edits, tmp_path):
    """It used to loop forever looking for a full micro-batch; now it stops before loading any model."""
    with pytest.raises(ValueError, match=r"has 4 usable rows, fewer than one micro-batch of --batch-size 8 x 1"):
        finetune(FinetuneConfig(dataset=str(edits), base="tiny-llava", out=str(tmp_path / "x"), batch_size=8))
    with pytest.raises(ValueError, match=r"has 2 usable rows"):
        finetune(FinetuneConfig(dataset=str(edits), base="tiny-llava", out=str(tmp_path / "x"), batch_size=3, limit=2))
