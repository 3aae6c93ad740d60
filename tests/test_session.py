"""IMG rounds end to end on the tiny stacks: records, determinism, critique steering, bad input."""

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from img_core.errors import (
    IncompatibleAlignerError,
    InvalidInputError,
    OutOfMemoryError,
    WeightsNotFoundError,
)
from img_core.session import IMGSession, RoundSettings

PROMPT = "A green banana and a brown horse."
STAGES = {"critique", "image_features", "align", "regenerate"}  # question mode: one MLLM prefill


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


@pytest.mark.parametrize("fixture", ["tiny_sdxl_session", "tiny_flux_session"])
def test_two_rounds_record_everything_and_change_the_image(request, fixture):
    session = request.getfixturevalue(fixture)
    record = session.run(PROMPT, seed=3, rounds=2, settings=RoundSettings(steps=2))
    assert [r.index for r in record.rounds] == [0, 1, 2]
    assert [r.source for r in record.rounds] == ["generated", "refined", "refined"]
    first, second, third = record.rounds
    assert first.image.size == (64, 64) and set(first.seconds) == {"generate"}
    for r in (second, third):
        assert set(r.seconds) == STAGES and all(v >= 0 for v in r.seconds.values())
        assert r.critique and r.guidance_mode == "question" and "{prompt}" not in r.question and PROMPT.rstrip(".") in r.question
        assert r.settings["ip_scale"] == 0.2 and r.settings["aligner_passes"] == 3 and r.settings["steps"] == 2
    assert np.abs(pixels(second.image) - pixels(first.image)).mean() > 0.5
    assert np.abs(pixels(third.image) - pixels(second.image)).mean() > 0.1
    assert [r.base_index for r in record.rounds] == [None, 0, 1]


def test_same_inputs_and_seed_give_the_same_images(tiny_sdxl_session):
    settings = RoundSettings(steps=2)
    a = tiny_sdxl_session.run(PROMPT, seed=5, rounds=1, settings=settings)
    b = tiny_sdxl_session.run(PROMPT, seed=5, rounds=1, settings=settings)
    c = tiny_sdxl_session.run(PROMPT, seed=6, rounds=1, settings=settings)
    for ra, rb in zip(a.rounds, b.rounds):
        assert np.array_equal(pixels(ra.image), pixels(rb.image))
        assert ra.critique == rb.critique
    assert np.abs(pixels(a.rounds[0].image) - pixels(c.rounds[0].image)).mean() > 0.5


def test_edited_critique_steers_the_next_round_in_dialogue_mode_only(tiny_sdxl_session):
    session = tiny_sdxl_session
    base = session.generate(PROMPT, 1, RoundSettings(steps=2)).image
    dialogue = RoundSettings(steps=2, guidance_mode="dialogue")
    original = session.refine(base, PROMPT, 1, critique="The horse is missing.", settings=dialogue)
    edited = session.refine(base, PROMPT, 1, critique="Make the banana bright green and add a brown horse.", settings=dialogue)
    assert edited.critique.startswith("Make the banana")
    assert np.abs(pixels(original.image) - pixels(edited.image)).mean() > 0.01
    question = RoundSettings(steps=2, guidance_mode="question")
    q1 = session.refine(base, PROMPT, 1, critique="The horse is missing.", settings=question)
    q2 = session.refine(base, PROMPT, 1, critique="Something else entirely.", settings=question)
    assert np.array_equal(pixels(q1.image), pixels(q2.image))


def test_ip_scale_and_passes_settings_take_effect(tiny_sdxl_session):
    session = tiny_sdxl_session
    first = session.generate(PROMPT, 2, RoundSettings(steps=2))
    at_zero = session.refine(first.image, PROMPT, 2, critique="x", settings=RoundSettings(steps=2, ip_scale=0.0))
    assert np.array_equal(pixels(at_zero.image), pixels(first.image))
    one_pass = session.refine(first.image, PROMPT, 2, critique="x", settings=RoundSettings(steps=2, aligner_passes=1))
    three = session.refine(first.image, PROMPT, 2, critique="x", settings=RoundSettings(steps=2, aligner_passes=3))
    assert np.abs(pixels(one_pass.image) - pixels(three.image)).mean() > 0.01


def test_start_from_users_image_and_save_record(tmp_path, tiny_sdxl_session):
    user_image = Image.new("L", (300, 200), 128)  # grayscale, other size: converted, kept as given
    record = tiny_sdxl_session.run(PROMPT, seed=0, rounds=1, settings=RoundSettings(steps=2), image=user_image)
    assert record.rounds[0].source == "uploaded" and record.rounds[0].image.mode == "RGB"
    assert record.rounds[1].image.size == (64, 64)
    record.save(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "session.json").read_text())
    assert saved["prompt"] == PROMPT and saved["preset"] == "tiny-sdxl" and len(saved["rounds"]) == 2
    assert saved["rounds"][1]["critique"] == record.rounds[1].critique
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["round_0.png", "round_1.png", "session.json"]
    with zipfile.ZipFile(record.write_zip(tmp_path / "session.zip")) as archive:
        assert sorted(archive.namelist()) == ["round_0.png", "round_1.png", "session.json"]


def test_bad_input_gets_one_clear_error_and_the_session_keeps_working(tmp_path, tiny_sdxl_session):
    session = tiny_sdxl_session
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        session.generate("   ", 0)
    with pytest.raises(InvalidInputError, match="not an image"):
        session.refine(not_image, PROMPT, 0)
    with pytest.raises(InvalidInputError, match="seed"):
        session.generate(PROMPT, "abc")
    with pytest.raises(InvalidInputError, match="steps"):
        session.generate(PROMPT, 0, RoundSettings(steps=0))
    with pytest.raises(InvalidInputError, match="guidance mode"):
        session.generate(PROMPT, 0, RoundSettings(guidance_mode="shout"))
    for bad_seed in (1.5, True, float("nan"), -1, 2**40):  # never silently rounded or clipped
        with pytest.raises(InvalidInputError, match="seed"):
            session.generate(PROMPT, bad_seed)
    with pytest.raises(InvalidInputError, match="prompt must be text"):
        session.generate(["a", "list"], 0)
    with pytest.raises(InvalidInputError, match="unknown preset"):
        IMGSession.from_preset("sdxl-turbo")
    long_prompt = " ".join(["a watercolor mural of foxes in a jazz band"] * 40)
    long_round = session.generate(long_prompt, 0, RoundSettings(steps=1))
    assert long_round.warnings and "tokens are cut" in long_round.warnings[0]
    assert session.generate(PROMPT, 0, RoundSettings(steps=1)).image.size == (64, 64)


def test_aligner_of_the_other_family_is_refused_naming_both(tiny_root):
    session = IMGSession.from_preset(
        "tiny-flux", device="cpu", aligner=tiny_root / "tiny-aligner-sdxl", show_progress_bars=False
    )
    with pytest.raises(IncompatibleAlignerError) as error:
        session.load()
    assert "sdxl-ip-adapter-plus-vit-h" in str(error.value) and "flux-xlabs-ip-adapter" in str(error.value)


def test_missing_weights_offline_name_the_id_and_how_to_fetch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    session = IMGSession.from_preset("sdxl", device="cpu")
    with pytest.raises(WeightsNotFoundError) as error:
        session.load()  # the IMG LLaVA is prepared first: it is what a first run downloads and converts
    message = str(error.value)
    assert "img-llava-13b" in message and "shi-labs/IMG" in message and "python -m img_core prepare" in message
    session = IMGSession.from_preset("sdxl", device="cpu", mllm="llava-1.5-13b")  # needs no preparation
    with pytest.raises(WeightsNotFoundError) as error:
        session.load()
    message = str(error.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and "hf download" in message


def test_cuda_out_of_memory_becomes_advice(tiny_sdxl_session):
    with pytest.raises(OutOfMemoryError, match="quantize the MLLM.*--offload"):
        with tiny_sdxl_session._stage("regenerate", {}):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
