"""Feature store format and the aligner training loop on tiny synthetic stores (CPU, offline)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from img_core.aligner import AlignerConfig, ImplicitAligner
from trainer import parse_config
from trainer.store import (
    FORMAT,
    FeatureSample,
    FeatureStore,
    bytes_per_sample,
    collate_features,
    shard_name,
    write_manifest,
    write_shard,
    write_synthetic_store,
)
from trainer.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "heads": 2, "dim_head": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- store


def test_store_round_trip_pads_and_masks(tmp_path):
    generator = torch.Generator().manual_seed(0)
    samples = [
        FeatureSample(torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator),
                      torch.randn(length, 6, generator=generator), source_index=10 + i)
        for i, length in enumerate([3, 5, 2])
    ]
    write_shard(tmp_path / shard_name(0), samples[:2], dtype="float16")
    write_shard(tmp_path / shard_name(1), samples[2:], dtype="float16")
    write_shard(tmp_path / shard_name(2), [], dtype="float16")  # an all-skipped range
    manifest = write_manifest(tmp_path, {"guidance_mode": "dialogue", "mllm": "tiny-llava", "chat_template": "llava-v1",
                                         "image_encoder": "tiny-clip", "image_feature_kind": "tiny"})
    assert manifest["format"] == FORMAT
    dims = (manifest["num_samples"], manifest["image_tokens"], manifest["image_dim"], manifest["guidance_dim"])
    assert dims == (3, 4, 8, 6)
    assert manifest["shards"] == [shard_name(0), shard_name(1)]
    assert manifest["guidance_mode"] == "dialogue" and manifest["image_feature_kind"] == "tiny"
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest

    store = FeatureStore(tmp_path)
    assert len(store) == 3
    for sample, stored in zip(samples, (store[i] for i in range(3))):
        length = sample.guidance.shape[0]
        assert stored["image_w"].dtype == torch.float16
        assert torch.equal(stored["image_w"], sample.image_w.half())
        assert torch.equal(stored["image_l"], sample.image_l.half())
        assert stored["guidance"].shape == (length, 6)  # the shard's trailing padding is cut off
        assert torch.equal(stored["guidance"], sample.guidance.half())
        assert stored["guidance_mask"].all()
    with pytest.raises(IndexError):
        store[3]

    batch = collate_features([store[0], store[2]])
    assert batch["guidance"].shape == (2, 3, 6)
    assert batch["guidance_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["guidance"][1, 2].abs().sum() == 0


def test_bytes_per_sample_matches_the_files(tmp_path):
    manifest = write_synthetic_store(tmp_path, 64, image_tokens=4, image_dim=32, guidance_dim=16,
                                     guidance_tokens=(8, 8), shard_size=64, dtype="float16")
    expected = bytes_per_sample(4, 32, 8, 16, "float16")
    assert expected == (2 * 4 * 32 + 8 * 16) * 2 + 8 + 8
    # the file also holds a small JSON header, shared by the shard's samples
    assert expected <= manifest["bytes_per_sample"] < expected + 1000 / 64


def test_store_refuses_foreign_or_broken_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore(tmp_path)
    write_synthetic_store(tmp_path, 8, shard_size=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "img-features/0"}))
    with pytest.raises(ValueError, match="img-features/1"):
        FeatureStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        FeatureStore(tmp_path)


# ----------------------------------------------------------------------------------------- training


def run_config(store, out, **overrides) -> TrainConfig:
    settings = {"features": str(store), "out": str(out), **TINY, "lr": 3e-3, "batch_size": 8, "max_steps": 12,
                "val_samples": 16, "val_every": 1000, "checkpoint_every": 1000, "log_every": 2}
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    write_synthetic_store(path, 96, shard_size=40, dtype="float16", seed=1)
    return path


def test_training_learns_the_synthetic_target(tmp_path):
    store = tmp_path / "store"
    write_synthetic_store(store, 2048, shard_size=512, target_scale=1.0, seed=0)
    final = train(run_config(store, tmp_path / "run", batch_size=16, max_steps=300, val_samples=64,
                             val_every=150, log_every=50))

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_mse" in r]
    assert [r["step"] for r in train_records] == [50, 100, 150, 200, 250, 300]
    assert set(train_records[0]) >= {"step", "loss", "base", "pref", "ref_updates", "lr", "samples_per_s"}
    assert all(r["lr"] == 3e-3 for r in train_records)
    assert train_records[-1]["base"] < train_records[0]["base"]
    assert train_records[-1]["ref_updates"] > 0
    assert [r["step"] for r in val_records] == [150, 300]
    last = val_records[-1]
    # With lam = 1, L_pref pushes past the winner (its gradient does not vanish at f = c_w), so the
    # optimum is not MSE 0; measured about 0.25 x identity. The identity baseline is ~0.39 here.
    assert last["val_mse_identity"] > 0.3
    assert last["val_mse"] < 0.4 * last["val_mse_identity"]
    assert last["val_win_rate"] > 0.9

    aligner = ImplicitAligner.from_pretrained(final)
    assert aligner.config.training_steps == 300
    assert (aligner.config.image_dim, aligner.config.guidance_dim, aligner.config.depth) == (32, 16, 2)
    assert aligner.config.mllm == "synthetic" and aligner.config.num_image_tokens == 4
    assert aligner.zero_linear.weight.abs().sum() > 0


def final_state(run: Path) -> dict:
    return torch.load(sorted((run / "checkpoints").glob("step-*"))[-1] / "checkpoint.pt", weights_only=True)


def metrics_without_timing(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "samples_per_s"} for record in records]


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["samples_seen"] == b["samples_seen"]
    assert a["updater"] == b["updater"]
    for key in ("aligner", "reference"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in state_a:
            assert torch.equal(state_a[name], state_b[name]), f"optimizer {name} differs"


def test_resume_from_a_checkpoint_is_bitwise_identical(small_store, tmp_path):
    # k = 2 so the reference is replaced several times, accumulation 2 so micro-batches matter, and 96
    # samples (80 for training) so the run crosses epochs.
    settings = {"ref_update_k": 2, "gradient_accumulation_steps": 2, "checkpoint_every": 4}
    train(run_config(small_store, tmp_path / "straight", max_steps=12, **settings))
    straight = final_state(tmp_path / "straight")
    assert straight["updater"]["updates"] >= 1

    interrupted = tmp_path / "interrupted"
    train(run_config(small_store, interrupted, max_steps=6, **settings))  # checkpoints at 4 and 6
    checkpoint = interrupted / "checkpoints" / "step-00000004"
    resumed_final = train(run_config(small_store, interrupted, max_steps=12, resume=str(checkpoint), **settings))
    assert_same_training_state(final_state(interrupted), straight)
    a = ImplicitAligner.from_pretrained(resumed_final).state_dict()
    b = ImplicitAligner.from_pretrained(tmp_path / "straight" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl has each step once, with the values of the uninterrupted run
    steps = [record["step"] for record in metrics_without_timing(interrupted)]
    assert steps == [2, 4, 6, 8, 10, 12, 12]  # the last 12 is the final validation
    assert metrics_without_timing(interrupted) == metrics_without_timing(tmp_path / "straight")

    with pytest.raises(ValueError, match="lr 0.003 -> 0.001"):
        train(run_config(small_store, interrupted, max_steps=14, lr=1e-3, resume="latest", **settings))
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        train(run_config(small_store, interrupted, max_steps=14, **settings))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(small_store, tmp_path):
    args = ["--features", str(small_store), "--depth", "2", "--heads", "2", "--dim-head", "16", "--lr", "3e-3",
            "--batch-size", "8", "--max-steps", "200", "--val-samples", "16", "--val-every", "1000",
            "--checkpoint-every", "10", "--ref-update-k", "3"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "trainer.train", *args, "--out", str(killed)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000010").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    cfg = parse_config(TrainConfig, [*args, "--out", str(killed), "--resume"])
    assert cfg.resume == "latest"
    train(cfg)
    train(parse_config(TrainConfig, [*args, "--out", str(tmp_path / "straight")]))
    assert_same_training_state(final_state(killed), final_state(tmp_path / "straight"))


def launch_two_processes(args: list[str]) -> None:
    """`torchrun --nproc_per_node 2` on CPU (gloo); ACCELERATE_USE_CPU makes accelerate use it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer.train", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("2 process(es) x 8 x 2 accumulation = 32 samples per step") == 2


@pytest.mark.slow
def test_two_process_run_resumes_bitwise(small_store, tmp_path):
    args = ["--features", str(small_store), "--depth", "2", "--heads", "2", "--dim-head", "16", "--lr", "3e-3",
            "--batch-size", "8", "--gradient-accumulation-steps", "2", "--val-samples", "16", "--val-every", "4",
            "--checkpoint-every", "4", "--log-every", "2", "--ref-update-k", "2"]
    launch_two_processes([*args, "--max-steps", "8", "--out", str(tmp_path / "straight")])
    launch_two_processes([*args, "--max-steps", "6", "--out", str(tmp_path / "cut")])
    launch_two_processes([*args, "--max-steps", "8", "--out", str(tmp_path / "cut"),
                          "--resume", str(tmp_path / "cut" / "checkpoints" / "step-00000004")])
    straight = final_state(tmp_path / "straight")
    assert straight["samples_seen"] == 8 * 32 and straight["updater"]["updates"] >= 1
    assert_same_training_state(final_state(tmp_path / "cut"), straight)
    assert metrics_without_timing(tmp_path / "cut") == metrics_without_timing(tmp_path / "straight")


def test_init_from_official_checkpoint_and_folder(small_store, tmp_path):
    generator = torch.Generator().manual_seed(5)
    source = ImplicitAligner(AlignerConfig(image_dim=32, guidance_dim=16, **TINY))
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    official = tmp_path / "aligner_tiny.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, official)  # DDP-style keys

    # lr 0 (AdamW's decay is lr * weight_decay, so also 0): the trained aligner is the loaded one
    final = train(run_config(small_store, tmp_path / "from_pth", init_from=str(official), lr=0.0, max_steps=2))
    loaded = ImplicitAligner.from_pretrained(final)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    assert loaded.config.mllm == "synthetic" and loaded.config.training_steps == 2

    final = train(run_config(small_store, tmp_path / "from_folder", init_from=str(final), lr=0.0, max_steps=1))
    loaded = ImplicitAligner.from_pretrained(final)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())

    wrong = tmp_path / "wrong.pth"
    torch.save(ImplicitAligner(AlignerConfig(image_dim=16, guidance_dim=16, **TINY)).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"\(16, 16\), the data has \(32, 16\)"):
        train(run_config(small_store, tmp_path / "wrong", init_from=str(wrong)))


def test_bad_settings_are_refused_with_the_flag_named(small_store, tmp_path):
    with pytest.raises(ValueError, match="--val-samples 96 leaves no training data"):
        train(run_config(small_store, tmp_path / "a", val_samples=96))
    with pytest.raises(ValueError, match="--features STORE is required"):
        train(run_config(small_store, tmp_path / "b", features=None))
    with pytest.raises(ValueError, match="--online needs --dataset and --preset"):
        train(run_config(small_store, tmp_path / "c", features=None, online=True))
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        train(run_config(small_store, tmp_path / "d", batch_size=0))


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide AcceleratorState whose mixed precision cannot change; its own
    tests reset it like this (private API), which lets one pytest process try another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_mixed_precision_bf16_trains_on_cpu(small_store, tmp_path, fresh_accelerator_state):
    final = train(run_config(small_store, tmp_path / "bf16", mixed_precision="bf16", max_steps=6))
    aligner = ImplicitAligner.from_pretrained(final)
    assert aligner.zero_linear.weight.dtype == torch.float32  # autocast only; weights stay float32
    assert torch.isfinite(aligner.zero_linear.weight).all() and aligner.zero_linear.weight.abs().sum() > 0


# ----------------------------------------------------------------------------------------- hardening


def poison_samples(store: Path, indices: list[int], value: float = float("nan")) -> None:
    """Put `value` into image_l of the given store samples (bypassing write_shard, which refuses it) and
    rewrite the manifest, so its checksums describe the poisoned shards: a store damaged upstream."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest = json.loads((store / "manifest.json").read_text())
    offset = 0
    for name, size in zip(manifest["shards"], manifest["shard_sizes"]):
        rows = [i - offset for i in indices if offset <= i < offset + size]
        if rows:
            with safe_open(str(store / name), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                metadata = handle.metadata()
            tensors["image_l"][rows, 0, 0] = value
            save_file(tensors, str(store / name), metadata=metadata)
        offset += size
    write_manifest(store, manifest)


def test_a_nan_sample_is_skipped_counted_and_never_saved(tmp_path):
    from trainer.train import split_indices

    store = tmp_path / "store"
    write_synthetic_store(store, 96, shard_size=40, seed=1)
    train_indices, val_indices = split_indices(96, 16, 0)
    poison_samples(store, [train_indices[0], val_indices[0]])  # one training, one held-out sample
    # batch 4 x accumulation 2 = 8 samples per step, 12 steps = 96 samples: the 80 training samples once
    final = train(run_config(store, tmp_path / "run", batch_size=4, gradient_accumulation_steps=2, max_steps=12))

    val_records = [r for r in metrics_without_timing(tmp_path / "run") if "val_mse" in r]
    assert val_records[-1]["val_skipped"] == 1 and np.isfinite(val_records[-1]["val_mse"])
    records = [r for r in metrics_without_timing(tmp_path / "run") if "loss" in r]
    assert records[-1]["skipped_nonfinite"] == 1 and records[-1]["skipped_unreadable"] == 0
    assert all(np.isfinite(r["loss"]) for r in records)
    state = final_state(tmp_path / "run")
    assert state["skipped"] == {"nonfinite": 1, "unreadable": 0}
    # no step was all-skipped, so every logged step is one optimizer step (AdamW counts its updates)
    assert all(int(s["step"]) == 12 for s in state["optimizer"]["state"].values())
    aligner = ImplicitAligner.from_pretrained(final)
    assert aligner.zero_linear.weight.abs().sum() > 0
    out = aligner.align(torch.randn(2, 4, 32), torch.randn(2, 5, 16))
    assert torch.isfinite(out).all()


def test_an_all_nan_store_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    from img_core.errors import CorruptFileError

    store = tmp_path / "store"
    write_synthetic_store(store, 48, shard_size=48, seed=1)
    poison_samples(store, list(range(48)), value=float("inf"))
    with pytest.raises(CorruptFileError, match="3 micro-batches in a row were skipped at step 3"):
        train(run_config(store, tmp_path / "run", max_skipped_in_a_row=3, checkpoint_every=1))
    assert not (tmp_path / "run" / "final").exists()
    from trainer.train import load_checkpoint

    # steps 1 and 2 made no update: their checkpoints hold the (finite) initial aligner
    folders = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [p.name for p in folders] == ["step-00000001", "step-00000002"]
    assert all(load_checkpoint(folder)["aligner"]["zero_linear.weight"].abs().sum() == 0 for folder in folders)
    records = metrics_without_timing(tmp_path / "run")
    assert records[0]["loss"] is None and records[0]["skipped_nonfinite"] == 2  # nothing to average


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "flipped":  # 4 KiB of inverted bytes in the middle of the file
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :])
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["flipped", "truncated", "empty"])
def test_a_damaged_checkpoint_falls_back_to_the_newest_good_one(small_store, tmp_path, caplog, kind):
    from img_core.errors import CorruptFileError

    settings = {"checkpoint_every": 2, "keep_checkpoints": 3, "max_steps": 6}
    train(run_config(small_store, tmp_path / "straight", **settings))
    run = tmp_path / "run"
    train(run_config(small_store, run, **settings))
    damage(run / "checkpoints" / "step-00000006" / "checkpoint.pt", kind)

    with pytest.raises(CorruptFileError, match=r"step-00000006/checkpoint.pt"):
        train(run_config(small_store, run, resume=str(run / "checkpoints" / "step-00000006"), **settings))
    with caplog.at_level("WARNING"):
        train(run_config(small_store, run, resume="latest", **settings))
    assert "step-00000006/checkpoint.pt" in caplog.text and "falling back" in caplog.text
    assert (run / "checkpoints" / "damaged-step-00000006").is_dir()
    assert_same_training_state(final_state(run), final_state(tmp_path / "straight"))  # redone from step 4

    for folder in (run / "checkpoints").glob("step-*"):
        damage(folder / "checkpoint.pt", kind)
    final_weights = (run / "final" / "model.safetensors").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    for attempt in range(3):  # the second --resume used to start from step 0, wiping metrics and final/
        with pytest.raises(CorruptFileError, match="every checkpoint in .* is damaged .*--restart"):
            train(run_config(small_store, run, resume="latest", **settings))
        with pytest.raises(ValueError, match="already holds a run: pass --resume to continue it, --restart"):
            train(run_config(small_store, run, **settings))
    assert (run / "final" / "model.safetensors").read_bytes() == final_weights
    assert (run / "metrics.jsonl").read_text() == metrics

    train(run_config(small_store, run, restart=True, **settings))  # the user's call: start over
    aside = tmp_path / "run.damaged-1"
    assert (aside / "final" / "model.safetensors").read_bytes() == final_weights
    assert (aside / "metrics.jsonl").read_text() == metrics
    assert_same_training_state(final_state(run), final_state(tmp_path / "straight"))


def test_keep_checkpoints_holds_after_a_resume(small_store, tmp_path):
    train(run_config(small_store, tmp_path, checkpoint_every=2, keep_checkpoints=3, max_steps=6))
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 3
    train(run_config(small_store, tmp_path, checkpoint_every=2, keep_checkpoints=2, max_steps=6, resume="latest"))
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-00000004", "step-00000006"]


@pytest.mark.parametrize("kind", ["flipped", "truncated", "empty", "missing"])
def test_a_damaged_shard_is_refused_naming_the_file(tmp_path, kind):
    from img_core.errors import CorruptFileError

    write_synthetic_store(tmp_path / "store", 32, shard_size=16, seed=2)
    shard = tmp_path / "store" / shard_name(1)
    if kind == "missing":
        shard.unlink()
    else:
        damage(shard, kind)
    error = FileNotFoundError if kind == "missing" else CorruptFileError
    with pytest.raises(error, match=rf"{shard}.*(missing|empty|damaged: its sha256).*re-run trainer.extract"):
        train(run_config(tmp_path / "store", tmp_path / "run", val_samples=4, max_steps=1))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: {**m, "shards": None}, r'field "shards" must be a list, found null'),
        (lambda m: [m], r"must hold a JSON object, it holds a list"),
        (lambda m: {**m, "num_samples": "32"}, r'field "num_samples" must be a number, found a string'),
        (lambda m: {**m, "shard_sha256": list(m["shard_sha256"].values())}, r'field "shard_sha256" must be an object'),
        (lambda m: {**m, "shards": ["../../etc/passwd"]}, r'field "shards" must list shard file names'),
    ],
)
def test_manifest_errors_name_the_file_and_the_field(tmp_path, edit, message):
    from img_core.errors import CorruptFileError

    manifest = write_synthetic_store(tmp_path, 8, shard_size=4)
    (tmp_path / "manifest.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'manifest.json'}(: | ){message}"):
        FeatureStore(tmp_path)


def test_a_truncated_manifest_names_the_file(tmp_path):
    from img_core.errors import CorruptFileError

    write_synthetic_store(tmp_path, 8, shard_size=4)
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'manifest.json'} is not valid JSON .*: line \d+"):
        FeatureStore(tmp_path)


def test_write_shard_refuses_non_finite_features(tmp_path):
    big = FeatureSample(torch.full((2, 4), 1e5), torch.zeros(2, 4), torch.zeros(3, 4))  # inf in float16
    with pytest.raises(ValueError, match="image_w hold NaN or inf .*float16"):
        write_shard(tmp_path / shard_name(0), [big], dtype="float16")
    assert not list(tmp_path.iterdir())
    write_shard(tmp_path / shard_name(0), [big], dtype="float32")  # representable in float32


def test_final_and_checkpoints_carry_checksums_verified_on_load(small_store, tmp_path, caplog):
    from img_core.errors import CorruptFileError
    from trainer.loop import verify_folder

    run = tmp_path / "run"
    final = train(run_config(small_store, run, max_steps=4, checkpoint_every=2, keep_checkpoints=2))
    for folder in (final, *sorted((run / "checkpoints").glob("step-*"))):
        listed = sorted(line.split()[1] for line in (folder / "SHA256SUMS").read_text().splitlines())
        assert listed == sorted(p.name for p in folder.iterdir() if p.name != "SHA256SUMS")
        verify_folder(folder)
    # a damaged final/ is refused by --init-from (it used to load unverified)
    weights = final / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"{weights} is damaged: its sha256"):
        train(run_config(small_store, tmp_path / "next", init_from=str(final), max_steps=1))
    assert not (tmp_path / "next").exists()
    # a checkpoint without any checksum cannot be told from a damaged one: resume falls back past it
    (run / "checkpoints" / "step-00000004" / "SHA256SUMS").unlink()
    with caplog.at_level("WARNING"):
        train(run_config(small_store, run, max_steps=4, checkpoint_every=2, keep_checkpoints=2, resume="latest"))
    assert "step-00000004 has no SHA256SUMS" in caplog.text
    assert (run / "checkpoints" / "damaged-step-00000004").is_dir()


def test_a_damaged_metrics_line_is_skipped_on_resume(small_store, tmp_path, caplog):
    settings = {"max_steps": 6, "checkpoint_every": 2, "log_every": 1}
    train(run_config(small_store, tmp_path / "straight", **settings))
    run = tmp_path / "run"
    train(run_config(small_store, run, **{**settings, "max_steps": 4}))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # a line cut by a crash or a disk error
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        train(run_config(small_store, run, **settings, resume="latest"))  # used to stop on the JSON error
    assert "metrics.jsonl line 2 is damaged" in caplog.text
    resumed = [r for r in metrics_without_timing(run) if "loss" in r]  # (the cut run also validated at step 4)
    assert [r["step"] for r in resumed] == [1, 3, 4, 5, 6]  # step 2's line is gone, nothing else
    straight = [r for r in metrics_without_timing(tmp_path / "straight") if "loss" in r]
    assert resumed == [r for r in straight if r["step"] != 2]


def test_sizes_are_checked_against_the_store_and_memory_before_work(small_store, tmp_path):
    # 96 samples, 16 held out: 80 to train on. --batch-size 100000 used to grow to 23 GB on a 387-sample store.
    with pytest.raises(ValueError, match=r"--batch-size 100000 is larger than the 80 training samples .* use "
                                         r"--batch-size 80 or less"):
        train(run_config(small_store, tmp_path / "big" / "run", batch_size=100_000))
    assert not (tmp_path / "big").exists()  # no empty --out (nor its parent) left behind
    # an aligner whose activations cannot fit: refused from the store's dims, before anything is allocated
    with pytest.raises(ValueError, match=r"one sample needs about \d+\.\d GiB .* GiB is free: use a smaller aligner"):
        train(run_config(small_store, tmp_path / "huge", heads=4096, dim_head=4096, batch_size=8))
    from trainer.train import micro_batch_bytes

    cfg = run_config(small_store, tmp_path / "x")
    manifest = FeatureStore(small_store).manifest
    assert micro_batch_bytes(cfg, manifest, 8) == 8 * micro_batch_bytes(run_config(small_store, tmp_path, batch_size=1),
                                                                      manifest, 8)
    with pytest.raises(ValueError, match=r"--batch-size 64 needs about .* use --batch-size \d+ or less with "
                                         r"--gradient-accumulation-steps \d+"):
        from trainer.train import check_sizes

        per_sample = micro_batch_bytes(run_config(small_store, tmp_path, batch_size=1), manifest,
                                       FeatureStore(small_store).max_guidance_tokens)
        import psutil

        dim_head = 16 * int(psutil.virtual_memory().available / per_sample / 16)  # ~ one sample per free memory
        check_sizes(run_config(small_store, tmp_path, batch_size=64, dim_head=dim_head), FeatureStore(small_store),
                    80, 1, torch.device("cpu"))


def test_argument_errors_are_one_line_and_leave_no_folder(small_store, tmp_path, capsys):
    from trainer.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--features", str(small_store), "--batch-size", "many", "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "invalid int value: 'many'" in message and "--help" in message
    with pytest.raises(SystemExit) as exit_info:
        main(["--features", str(small_store), "--val-samples", "16", "--batch-size", "100000", "--out", str(tmp_path / "b")])
    assert str(exit_info.value.code).startswith("error: --batch-size 100000 is larger")
    assert "\n" not in str(exit_info.value.code)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
