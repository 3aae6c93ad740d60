"""Feature extraction from a tiny Pick-a-Pic-style parquet (tiny-sdxl preset), training on the store and
--online, and loading the trained aligner into an img_core session."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import png_bytes

from img_core.images import load_image
from trainer.data import PreferencePairs
from trainer.extract import ExtractConfig, OnlineTriplets, extract
from trainer.store import FeatureStore, read_shard_header, shard_name
from trainer.train import TrainConfig, train

TINY = {"depth": 2, "heads": 2, "dim_head": 16}
# row: caption, jpg_0 seed (None = corrupt bytes), jpg_1 seed, label_0, label_1
ROWS = [
    ("a red cube on a wooden table", 0, 1, 1.0, 0.0),
    ("a tie between two images", 2, 3, 0.5, 0.5),
    ("an image that cannot be decoded", 4, None, 0.0, 1.0),
    ("a blue sphere in the snow", 5, 6, 0.0, 1.0),
    ("a cat wearing a hat", 7, 8, 1.0, 0.0),
    ("two dogs playing chess", 9, 10, 0.0, 1.0),
    ("a lighthouse at night", 11, 12, 1.0, 0.0),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def without_checksums(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key != "shard_sha256"}




@pytest.fixture(scope="module")
def pick_a_pic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickapic")
    columns = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for caption, first, second, label_0, label_1 in ROWS:
        columns["caption"].append(caption)
        columns["jpg_0"].append(png_bytes(first))
        columns["jpg_1"].append(png_bytes(second) if second is not None else b"\x89PNG broken")
        columns["label_0"].append(label_0)
        columns["label_1"].append(label_1)
    for name in ("jpg_0", "jpg_1"):
        columns[name] = pa.array(columns[name], pa.binary())
    table = pa.table(columns)
    pq.write_table(table.slice(0, 4), folder / "train-00000.parquet", row_group_size=3)
    pq.write_table(table.slice(4), folder / "train-00001.parquet")
    return folder


@pytest.fixture(scope="module")
def store(pick_a_pic, tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    manifest = extract(ExtractConfig(dataset=str(pick_a_pic), out=str(out), preset="tiny-sdxl", shard_size=3))
    return out, manifest


def test_pairs_reader_orders_winner_and_loser_and_spots_ties(pick_a_pic):
    pairs = PreferencePairs(pick_a_pic)
    assert len(pairs) == 7
    assert pairs.decided_rows() == [0, 2, 3, 4, 5, 6]
    assert pairs[1] is None
    assert pairs[0].winner == png_bytes(0) and pairs[0].loser == png_bytes(1)  # label_0 = 1
    assert pairs[3].winner == png_bytes(6) and pairs[3].loser == png_bytes(5)  # label_1 = 1
    assert pairs[6].caption == "a lighthouse at night"  # second file
    assert len(PreferencePairs(pick_a_pic, limit=3)) == 3


def test_extraction_skips_ties_and_corrupt_images_and_records_metadata(store):
    out, manifest = store
    assert manifest["format"] == "img-features/1"
    assert manifest["num_samples"] == 5 and manifest["source_rows"] == 7
    assert manifest["skipped"] == {"ties": 1, "corrupt": 1, "empty_caption": 0, "nonfinite": 0}
    assert manifest["corrupt_rows"] == [2]
    assert manifest["shards"] == [shard_name(0), shard_name(1), shard_name(2)]
    assert manifest["shard_sizes"] == [1, 3, 1]  # rows 0-2, 3-5, 6
    assert (manifest["image_tokens"], manifest["guidance_dim"]) == (16, 64)
    assert manifest["mllm"] == "tiny-llava" and manifest["chat_template"] == "llava-v0"
    assert manifest["guidance_mode"] == "question" and manifest["preset"] == "tiny-sdxl"
    assert manifest["image_feature_kind"] == "sdxl-ip-adapter-plus-vit-h"
    assert manifest["image_encoder"] == "tiny-ip-adapter/models/image_encoder"
    assert manifest["bytes_per_sample"] > 0
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_stored_features_are_what_the_session_computes(store, tiny_sdxl_session):
    out, _ = store
    features = FeatureStore(out)
    assert read_shard_header(out / shard_name(1))["num_samples"] == 3  # rows 3, 4, 5
    stored = features[1]  # second sample = source row 3: winner jpg_1 (seed 6), loser jpg_0 (seed 5)
    winner, loser = load_image(png_bytes(6)), load_image(png_bytes(5))
    expected_w = tiny_sdxl_session.backend.image_features(winner)[0]
    expected_l = tiny_sdxl_session.backend.image_features(loser)[0]
    expected_g = tiny_sdxl_session.critic.guidance(loser, "a blue sphere in the snow", mode="question", seed=3)[0]
    assert stored["image_w"].dtype == torch.float16
    torch.testing.assert_close(stored["image_w"].float(), expected_w, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stored["image_l"].float(), expected_l, atol=2e-3, rtol=2e-3)
    assert stored["guidance"].shape == expected_g.shape
    torch.testing.assert_close(stored["guidance"].float(), expected_g, atol=2e-2, rtol=2e-3)


def test_extraction_resumes_by_skipping_finished_shards(store, pick_a_pic, tmp_path):
    out, manifest = store
    copy = tmp_path / "store"
    copy.mkdir()
    for name in manifest["shards"]:
        (copy / name).write_bytes((out / name).read_bytes())
    (copy / shard_name(1)).unlink()  # as if killed while writing shard 1
    (copy / (shard_name(1) + ".tmp")).write_bytes(b"half a shard")
    before = {name: (copy / name).stat().st_mtime_ns for name in (shard_name(0), shard_name(2))}
    resumed = extract(ExtractConfig(dataset=str(pick_a_pic), out=str(copy), preset="tiny-sdxl", shard_size=3))
    assert {name: (copy / name).stat().st_mtime_ns for name in before} == before  # not redone
    assert without_checksums(resumed) == without_checksums(manifest)
    # safetensors writes header keys in a random order, so only the untouched shards keep their digest
    assert {name: resumed["shard_sha256"][name] for name in before} == {
        name: manifest["shard_sha256"][name] for name in before}
    assert torch.equal(FeatureStore(copy)[2]["guidance"], FeatureStore(out)[2]["guidance"])
    with pytest.raises(ValueError, match="use another --out"):
        extract(ExtractConfig(dataset=str(pick_a_pic), out=str(copy), preset="tiny-sdxl", shard_size=3, seed=1))


@pytest.mark.slow
def test_two_processes_split_the_shards_and_write_the_same_store(store, pick_a_pic, tmp_path):
    out, manifest = store
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "trainer.extract", "--dataset", str(pick_a_pic), "--preset", "tiny-sdxl", "--out", str(tmp_path / "two"),
               "--shard-size", "3"]
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("row 2: unreadable image") == 1  # shard 0 was extracted by one process only
    two_manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert without_checksums(two_manifest) == without_checksums(manifest)
    two, one = FeatureStore(tmp_path / "two"), FeatureStore(out)
    for index in range(len(one)):
        for key in ("image_w", "image_l", "guidance", "guidance_mask"):
            assert torch.equal(two[index][key], one[index][key]), (index, key)


def test_dialogue_mode_teacher_forces_the_critique(pick_a_pic, tiny_root, tmp_path):
    manifest = extract(ExtractConfig(dataset=str(pick_a_pic), out=str(tmp_path / "dialogue"), preset="tiny-sdxl",
                                     guidance_mode="dialogue", limit=1, max_critique_tokens=6))
    assert manifest["guidance_mode"] == "dialogue" and manifest["num_samples"] == 1
    dialogue_store = FeatureStore(tmp_path / "dialogue")
    question = extract(
        ExtractConfig(dataset=str(pick_a_pic), out=str(tmp_path / "question"), preset="tiny-sdxl", limit=1)
    )
    assert question["num_samples"] == 1
    # the answer (at least MIN_CRITIQUE_TOKENS tokens) plus the answer separator come after the question
    assert dialogue_store[0]["guidance"].shape[0] > FeatureStore(tmp_path / "question")[0]["guidance"].shape[0]


def test_sources_that_cannot_be_read_say_why():
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        PreferencePairs("./no/such/folder")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            PreferencePairs("yuvalkirstain/pickapic_v2")


def test_training_on_the_extracted_store_gives_an_aligner_the_session_loads(store, tiny_root, tmp_path):
    from img_core.session import IMGSession, RoundSettings

    out, _ = store
    final = train(TrainConfig(features=str(out), out=str(tmp_path / "run"), **TINY, batch_size=2, max_steps=4,
                              val_samples=1, val_every=2, log_every=2))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 2, 4, 4]
    config = json.loads((final / "config.json").read_text())
    assert config["mllm"] == "tiny-llava" and config["chat_template"] == "llava-v0"
    assert config["image_feature_kind"] == "sdxl-ip-adapter-plus-vit-h" and config["training_steps"] == 4

    session = IMGSession.from_preset("tiny-sdxl", device="cpu", aligner=str(final), show_progress_bars=False).load()
    assert session.aligner.config.training_steps == 4
    first = session.generate("a red cube", seed=0, settings=RoundSettings(steps=2))
    refined = session.refine(first.image, "a red cube", seed=0, critique="make it red", settings=RoundSettings(steps=2))
    assert refined.image.size == first.image.size


def test_online_features_match_the_store_and_online_training_runs(store, pick_a_pic, tmp_path):
    out, _ = store
    online = OnlineTriplets(str(pick_a_pic), "tiny-sdxl", "question", device="cpu")
    assert len(online) == 6  # non-tie rows, the corrupt one included (it yields None)
    assert online[1] is None  # row 2: corrupt
    stored = FeatureStore(out)
    torch.testing.assert_close(online[2]["image_w"], stored[1]["image_w"].float(), atol=2e-3, rtol=2e-3)  # row 3
    torch.testing.assert_close(online[2]["guidance"], stored[1]["guidance"].float(), atol=2e-2, rtol=2e-3)
    assert online.manifest["mllm"] == "tiny-llava" and online.manifest["image_dim"] == stored.image_dim

    final = train(TrainConfig(online=True, dataset=str(pick_a_pic), preset="tiny-sdxl", out=str(tmp_path / "online"),
                              **TINY, batch_size=2, max_steps=3, val_samples=1, log_every=1))
    records = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert json.loads((final / "config.json").read_text())["training_steps"] == 3


def test_a_damaged_shard_is_re_extracted_on_rerun(store, pick_a_pic, tmp_path):
    from trainer.store import MANIFEST_NAME

    out, manifest = store
    copy = tmp_path / "store"
    copy.mkdir()
    for name in [*manifest["shards"], MANIFEST_NAME]:
        (copy / name).write_bytes((out / name).read_bytes())
    flipped = (copy / shard_name(1)).read_bytes()
    middle = len(flipped) // 2
    (copy / shard_name(1)).write_bytes(flipped[:middle] + bytes(b ^ 0xFF for b in flipped[middle : middle + 4096])
                                       + flipped[middle + 4096 :])
    (copy / shard_name(2)).write_bytes((copy / shard_name(2)).read_bytes()[:100])  # truncated
    untouched = (copy / shard_name(0)).stat().st_mtime_ns

    resumed = extract(ExtractConfig(dataset=str(pick_a_pic), out=str(copy), preset="tiny-sdxl", shard_size=3))
    assert (copy / shard_name(0)).stat().st_mtime_ns == untouched
    assert without_checksums(resumed) == without_checksums(manifest)
    repaired, original = FeatureStore(copy), FeatureStore(out)  # verifies every shard's sha256
    for index in range(len(original)):
        for key in ("image_w", "image_l", "guidance"):
            assert torch.equal(repaired[index][key], original[index][key]), (index, key)


def test_non_finite_features_are_not_stored_and_the_rows_reported(pick_a_pic, tiny_root, tmp_path):
    """Real tiny models whose IP-Adapter output is scaled so that exactly one pair's features overflow
    float16 storage: that row is skipped and reported, the others are stored."""
    from trainer.extract import FeatureExtractor

    extractor = FeatureExtractor("tiny-sdxl", "cpu")
    rows = [0, 3, 4, 5, 6]  # decided rows with readable images (row 1 is a tie, row 2 corrupt)
    pairs = PreferencePairs(pick_a_pic)
    peak = {}
    for row in rows:
        pair = pairs[row]
        features = [extractor.backend.image_features(load_image(data)) for data in (pair.winner, pair.loser)]
        peak[row] = max(float(f.abs().max()) for f in features)
    (first, top), (_, second) = sorted(peak.items(), key=lambda item: -item[1])[:2]
    assert top > 1.01 * second
    norm_out = extractor.backend.denoiser.encoder_hid_proj.image_projection_layers[0].norm_out
    with torch.no_grad():  # a LayerNorm's output scales exactly with its affine weights
        scale = 65504.0 / (top * second) ** 0.5
        norm_out.weight.mul_(scale)
        norm_out.bias.mul_(scale)

    manifest = extract(ExtractConfig(dataset=str(pick_a_pic), out=str(tmp_path / "store"), preset="tiny-sdxl",
                                     shard_size=3, dtype="float16"), extractor=extractor)
    assert manifest["skipped"] == {"ties": 1, "corrupt": 1, "empty_caption": 0, "nonfinite": 1}
    assert manifest["nonfinite_rows"] == [first] and manifest["num_samples"] == 4
    stored = FeatureStore(tmp_path / "store")
    assert all(torch.isfinite(stored[i][key]).all() for i in range(len(stored)) for key in ("image_w", "image_l"))


def test_online_steps_stay_optimizer_steps_when_a_micro_batch_is_unreadable(pick_a_pic, tmp_path):
    """Batch 1 x accumulation 2: the corrupt row fills one micro-batch on its own. Before the fix it
    skipped accelerate's accumulate(), so the optimizer stepped out of phase with the logged steps."""
    run = tmp_path / "online"
    train(TrainConfig(online=True, dataset=str(pick_a_pic), preset="tiny-sdxl", out=str(run), **TINY,
                      batch_size=1, gradient_accumulation_steps=2, max_steps=3, val_samples=1, log_every=1))
    checkpoint = torch.load(run / "checkpoints" / "step-00000003" / "checkpoint.pt", weights_only=True)
    assert {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()} == {3}
    assert checkpoint["skipped"] == {"nonfinite": 0, "unreadable": 1}  # 6 micro-batches = the 5 train rows + 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_unreadable"] for r in records if "loss" in r][-1] == 1


@pytest.mark.parametrize("manifest_damage", ["truncated", "missing"])
def test_a_damaged_shard_with_a_damaged_manifest_is_re_extracted(store, pick_a_pic, tmp_path, manifest_damage):
    """128 values of a shard changed (up to +977.5) and the manifest truncated or missing: the rerun used to
    keep the shard (no manifest digest to compare with) and record its new checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from trainer.store import MANIFEST_NAME

    out, manifest = store
    copy = tmp_path / "store"
    copy.mkdir()
    for name in [*manifest["shards"], MANIFEST_NAME]:
        (copy / name).write_bytes((out / name).read_bytes())
    shard = copy / shard_name(1)
    with safe_open(str(shard), framework="pt") as handle:  # readable, same header: damage only a digest sees
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    tensors["image_l"].view(-1)[:128] += 977.5
    save_file(tensors, str(shard), metadata=metadata)
    text = (copy / MANIFEST_NAME).read_text()
    if manifest_damage == "truncated":
        (copy / MANIFEST_NAME).write_text(text[: len(text) // 2])
    else:
        (copy / MANIFEST_NAME).unlink()

    resumed = extract(ExtractConfig(dataset=str(pick_a_pic), out=str(copy), preset="tiny-sdxl", shard_size=3))
    assert without_checksums(resumed) == without_checksums(manifest)
    repaired, original = FeatureStore(copy), FeatureStore(out)
    for index in range(len(original)):
        assert torch.equal(repaired[index]["image_l"], original[index]["image_l"]), index


@pytest.mark.slow
def test_dialogue_recipe_trains_an_aligner_the_session_loads(pick_a_pic, tiny_root, tmp_path):
    """The documented recipe: extract dialogue-mode guidance (critiques written by the MLLM, or taken from a
    column), train on it, load the result with --aligner and refine with an edited critique."""
    from img_core.session import IMGSession, RoundSettings

    table = pq.read_table(pick_a_pic)
    critiques = [f"the {word} is wrong, make it match the caption" for word in
                 ("colour", "tie", "image", "sphere", "hat", "board", "light")]
    with_critiques = tmp_path / "pairs"
    with_critiques.mkdir()
    pq.write_table(table.append_column("critique", pa.array(critiques)), with_critiques / "train.parquet")

    def extract_mode(out: str, **settings) -> FeatureStore:
        extract(ExtractConfig(dataset=str(with_critiques), out=str(tmp_path / out), preset="tiny-sdxl", limit=4,
                              max_critique_tokens=6, **settings))
        return FeatureStore(tmp_path / out)

    question = extract_mode("question")
    written = extract_mode("dialogue-mllm", guidance_mode="dialogue")
    given = extract_mode("dialogue-column", guidance_mode="dialogue", critique_column="critique")
    assert (question.manifest["guidance_mode"], given.manifest["guidance_mode"]) == ("question", "dialogue")
    assert written.manifest["critique_source"] == "mllm" and given.manifest["critique_source"] == "column:critique"
    assert len(question) == len(given) == 2  # rows 0 and 3 (row 1 is a tie, row 2 unreadable)
    for index in range(2):
        lengths = [store[index]["guidance"].shape[0] for store in (question, written, given)]
        assert lengths[1] > lengths[0] and lengths[2] > lengths[0], lengths  # the answer tokens come after
        tail = given[index]["guidance"][-4:].float()
        assert not torch.allclose(tail, written[index]["guidance"][-4:].float())  # another critique, other guidance
        assert torch.equal(given[index]["image_l"], question[index]["image_l"])  # same pairs, same images

    final = train(TrainConfig(features=str(tmp_path / "dialogue-column"), out=str(tmp_path / "run"), **TINY,
                              batch_size=1, max_steps=3, val_samples=0, log_every=1, lr=1e-2))
    assert json.loads((final / "config.json").read_text())["guidance_mode"] == "dialogue"
    session = IMGSession.from_preset("tiny-sdxl", device="cpu", aligner=str(final), show_progress_bars=False).load()
    assert session.aligner.config.guidance_mode == "dialogue" and session.aligner.config.training_steps == 3
    first = session.generate("a red cube", seed=0, settings=RoundSettings(steps=2))
    settings = RoundSettings(steps=2, guidance_mode="dialogue")
    blue = session.refine(first.image, "a red cube", seed=0, critique="make the cube blue", settings=settings)
    green = session.refine(first.image, "a red cube", seed=0, critique="add a green tree", settings=settings)
    assert np.abs(np.asarray(blue.image, np.int16) - np.asarray(green.image, np.int16)).max() > 0


def test_critique_column_needs_dialogue_mode(tmp_path):
    with pytest.raises(ValueError, match="--critique-column critique needs --guidance-mode dialogue"):
        extract(ExtractConfig(dataset="x", out=str(tmp_path / "out"), critique_column="critique"))
    assert not (tmp_path / "out").exists()
