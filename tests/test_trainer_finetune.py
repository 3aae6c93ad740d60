"""LoRA / QLoRA fine-tuning of the tiny MLLMs on a tiny InstructPix2Pix-style parquet; the merged result
loads with img_core's MLLM loader and yields guidance."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import png_bytes as shared_png_bytes
from safetensors.torch import load_file

from img_core.errors import CorruptFileError
from img_core.images import load_image
from img_core.mllm import KNOWN_MLLMS, MLLMCritic, resolve_spec
from trainer import parse_config
from trainer.data import EditTriplets
from trainer.finetune_mllm import (
    METRICS_NAME,
    FinetuneConfig,
    answer_loss,
    base_spec,
    conversation,
    finetune,
    load_finetune_checkpoint,
    micro_batch_rows,
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


# ----------------------------------------------------------------------------------------- checkpoints, resume

REPO = Path(__file__).resolve().parents[1]


def lora_of_last_checkpoint(out: Path) -> dict[str, torch.Tensor]:
    folder = sorted((out / "checkpoints").glob("step-*"))[-1]
    return load_finetune_checkpoint(folder)["lora"]


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def resume_settings(edits, out: Path, **overrides) -> FinetuneConfig:
    # dropout > 0 so the restored RNG state matters; accumulation 2 and 4 rows / 2 per step cross epochs
    settings = {"dataset": str(edits), "base": "tiny-llava", "out": str(out), "batch_size": 1,
                "gradient_accumulation_steps": 2, "lr": 5e-3, "lora_rank": 4, "lora_dropout": 0.2,
                "save_dtype": "float32", "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5}
    return FinetuneConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_resume_gives_the_weights_of_the_uninterrupted_run(edits, tiny_root, tmp_path):
    straight = finetune(resume_settings(edits, tmp_path / "straight", max_steps=6))
    cut = tmp_path / "cut"
    finetune(resume_settings(edits, cut, max_steps=3))  # checkpoints at 2 and 3
    assert (cut / "checkpoints" / "step-00000003" / "SHA256SUMS").is_file()
    finetune(resume_settings(edits, cut, max_steps=6, resume=str(cut / "checkpoints" / "step-00000002")))
    assert_same_lora(lora_of_last_checkpoint(cut), lora_of_last_checkpoint(straight))
    adapter_a = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    adapter_b = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert_same_lora(adapter_a, adapter_b)
    # the metrics have each step once, as the uninterrupted run logged them
    def losses(out):
        return [(r["step"], r["answer_loss"]) for r in map(json.loads, (out / METRICS_NAME).read_text().splitlines())]
    assert losses(cut) == losses(straight) and [step for step, _ in losses(cut)] == [1, 2, 3, 4, 5, 6]

    with pytest.raises(ValueError, match="settings changed since the checkpoint: lr 0.005 -> 0.001"):
        finetune(resume_settings(edits, cut, max_steps=8, lr=1e-3, resume="latest"))
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        finetune(resume_settings(edits, cut, max_steps=8))


def test_a_finetune_with_all_checkpoints_damaged_refuses_until_restart(edits, tiny_root, tmp_path):
    out = tmp_path / "run"
    finetune(resume_settings(edits, out, max_steps=2, checkpoint_every=1))
    for folder in (out / "checkpoints").glob("step-*"):
        checkpoint = folder / "checkpoint.pt"
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    merged = (out / "model.safetensors").read_bytes()
    for attempt in range(2):  # the second --resume used to start from step 0 and overwrite the model
        with pytest.raises(CorruptFileError, match="every checkpoint in .* is damaged .*--restart"):
            finetune(resume_settings(edits, out, max_steps=2, checkpoint_every=1, resume="latest"))
    assert (out / "model.safetensors").read_bytes() == merged
    finetune(resume_settings(edits, out, max_steps=1, restart=True))
    assert (tmp_path / "run.damaged-1" / "model.safetensors").read_bytes() == merged
    assert [json.loads(line)["step"] for line in (out / METRICS_NAME).read_text().splitlines()] == [1]


@pytest.mark.slow
def test_a_killed_finetune_resumes_to_the_same_weights(edits, tiny_root, tmp_path):
    args = ["--dataset", str(edits), "--base", "tiny-llava", "--batch-size", "1", "--gradient-accumulation-steps", "2",
            "--lr", "5e-3", "--lora-rank", "4", "--lora-dropout", "0.2", "--save-dtype", "float32",
            "--checkpoint-every", "2", "--max-steps", "40"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "trainer.finetune_mllm", *args, "--out", str(killed)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (killed / "checkpoints" / "step-00000004").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"

    cfg = parse_config(FinetuneConfig, [*args, "--out", str(killed), "--resume"])
    assert cfg.resume == "latest"
    finetune(cfg)
    finetune(parse_config(FinetuneConfig, [*args, "--out", str(tmp_path / "straight")]))
    assert_same_lora(lora_of_last_checkpoint(killed), lora_of_last_checkpoint(tmp_path / "straight"))
    # log lines every 10 steps, checkpoints every 2: the first line after the resume still averages steps 1-10
    def losses(out):
        return [(r["step"], r["answer_loss"]) for r in map(json.loads, (out / METRICS_NAME).read_text().splitlines())]
    assert losses(killed) == losses(tmp_path / "straight") and [s for s, _ in losses(killed)] == [10, 20, 30, 40]


@pytest.mark.slow
def test_two_processes_finish_when_one_last_micro_batch_is_unreadable(tiny_root, tmp_path):
    """Process 1's last micro-batch holds the only unreadable image. The old loop skipped its backward
    with `continue`, so process 0 waited in DDP's gradient all-reduce for a process that never came."""
    rows, batch_size, processes, seed = 4, 1, 2, 0
    last_of_process_1 = next(micro_batch_rows(rows, batch_size, 1, processes, seed, start=1))[0][0]
    images = [{"bytes": png_bytes(i), "path": None} for i in range(rows)]
    images[last_of_process_1] = {"bytes": b"\x89PNG broken", "path": None}
    pq.write_table(pa.table({
        "original_image": pa.array(images),
        "edited_prompt": [f"a photo of a {colour} house" for colour in COLOURS],
        "edit_prompt": [f"make the house {colour}" for colour in COLOURS],
    }), tmp_path / "train.parquet")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "trainer.finetune_mllm", "--dataset", str(tmp_path), "--base", "tiny-llava", "--out", str(out),
               "--batch-size", str(batch_size), "--gradient-accumulation-steps", "2", "--max-steps", "1",
               "--lora-rank", "4", "--lr", "5e-3", "--save-dtype", "float32", "--seed", str(seed)]
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
                                start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process fine-tuning hung (a process skipped the gradient all-reduce)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"row {last_of_process_1} skipped" in result.stderr
    records = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["answer_loss"] > 0  # 3 used micro-batches
    lora = lora_of_last_checkpoint(out)
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().sum() > 0 for name, v in lora.items() if "lora_B" in name)  # the step was taken
