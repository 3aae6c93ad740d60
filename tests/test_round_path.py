"""One round path (issue 7): the session computes each thing once per round, the UI and the CLI make the
same round for the same inputs, and the caches change cost, never results."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from img_core.record import Round
from img_core.session import IMGSession, RoundSettings, StageEvent

PROMPT = "A green banana and a brown horse."
SETTINGS = RoundSettings(steps=2)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


@pytest.fixture()
def fresh_session(tiny_root):
    """A session of its own: caches start empty, forward hooks do not leak into other tests."""
    return IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False).load()


def count_forwards(modules: dict[str, torch.nn.Module]) -> tuple[Counter, list]:
    calls: Counter = Counter()
    handles = [module.register_forward_hook(lambda *_, name=name: calls.update([name])) for name, module in modules.items()]
    return calls, handles


def test_three_question_rounds_run_each_text_encoder_once_and_the_vision_tower_once_per_round(fresh_session):
    session = fresh_session
    pipeline, mllm = session.backend.pipeline, session.critic.model
    calls, handles = count_forwards({
        "clip_text": pipeline.text_encoder,
        "clip_text_2": pipeline.text_encoder_2,
        "mllm_vision": mllm.model.vision_tower,
        "ip_image_encoder": pipeline.image_encoder,
    })  # fmt: skip
    try:
        record = session.run(PROMPT, seed=3, rounds=3, settings=SETTINGS)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["clip_text"] == 1 and calls["clip_text_2"] == 1  # round 0 encodes the prompt; refines reuse it
    assert calls["mllm_vision"] == 3  # critique and guidance share one prefill per round
    assert calls["ip_image_encoder"] == 3  # one base image per round (the negative tokens were made at load)
    assert all(r.critique for r in record.rounds[1:])


def test_caches_change_cost_not_results(fresh_session):
    """A cached round equals one computed from scratch: separate guidance forward, fresh text encoding."""
    session = fresh_session
    first = session.generate(PROMPT, 4, SETTINGS)
    cached = session.refine(first, PROMPT, 4, settings=SETTINGS)
    # The guidance captured from the critique's prefill equals a plain forward pass over the same question.
    reading = session.critic.read(first.image, PROMPT, seed=4, write_critique=True, max_new_tokens=96)
    separate = session.critic.guidance(first.image, PROMPT, seed=4, question=reading.question)
    assert reading.question == cached.question
    assert torch.allclose(reading.guidance, separate, atol=1e-5, rtol=1e-5)
    # Cleared caches (text embeddings, the base's IP features) give the same pixels.
    session.backend._prompt_embeddings.clear()
    uncached = session.refine(first.image, PROMPT, 4, settings=SETTINGS)
    assert np.array_equal(pixels(cached.image), pixels(uncached.image))
    assert first.image_features is not None  # kept with the round it belongs to


def test_refining_again_from_the_same_round_reuses_its_ip_features(fresh_session):
    session = fresh_session
    first = session.generate(PROMPT, 1, SETTINGS)
    calls, handles = count_forwards({"ip_image_encoder": session.backend.pipeline.image_encoder})
    try:
        a = session.refine(first, PROMPT, 1, settings=SETTINGS)
        b = session.refine(first, PROMPT, 1, settings=SETTINGS)
    finally:
        handles[0].remove()
    assert calls["ip_image_encoder"] == 1
    assert np.array_equal(pixels(a.image), pixels(b.image))


def test_no_critique_is_the_release_path_with_the_same_image(fresh_session):
    session = fresh_session
    first = session.generate(PROMPT, 2, SETTINGS)
    with_text = session.refine(first, PROMPT, 2, settings=SETTINGS)
    without = session.refine(first, PROMPT, 2, settings=RoundSettings(steps=2, critique=False))
    assert without.critique is None and with_text.critique
    assert without.question == with_text.question and set(without.seconds) >= {"guidance", "regenerate"}
    assert np.array_equal(pixels(with_text.image), pixels(without.image))
    with pytest.raises(Exception, match="dialogue mode"):
        RoundSettings(guidance_mode="dialogue", critique=False).check()


def test_critique_and_guidance_ask_the_same_seeded_question(fresh_session):
    """The UI's Critique button and the round's guidance use one seed: in dialogue mode the critique that steers
    the round answers the question the guidance asks."""
    session = fresh_session
    first = session.generate(PROMPT, 0, SETTINGS)
    seed = next(s for s in range(1, 60) if session.critic.question_for(PROMPT, s) != session.critic.question_for(PROMPT, 0))
    shown = session.critique(first.image, PROMPT, seed=seed)
    made = session.refine(first, PROMPT, seed, settings=RoundSettings(steps=2, guidance_mode="dialogue"))
    assert made.critique == shown
    assert made.question == session.critic.question_for(PROMPT, seed)
    assert made.question_source == "ours"


def test_stage_events_report_every_stage_steps_and_streamed_critique(fresh_session):
    events: list[StageEvent] = []
    first = fresh_session.generate(PROMPT, 0, SETTINGS, on_stage=events.append)
    fresh_session.refine(first, PROMPT, 0, settings=SETTINGS, index=1, on_stage=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "generate" and stages.count("done") == 2
    for stage in ("critique", "image_features", "align", "regenerate"):
        assert stage in stages
    steps = [(e.step, e.total) for e in events if e.stage == "regenerate" and e.step]
    assert steps == [(1, 2), (2, 2)]
    streamed = [e.text for e in events if e.text is not None]
    assert len(streamed) >= 2 and streamed[-1] and all(e.round_index == 1 for e in events[len(stages) // 3:] if e.stage == "align")


def test_the_ui_and_the_cli_make_the_same_round(tmp_path, tiny_root):
    from img_core.cli.main import main as cli_main
    from ui.handlers import Studio
    from ui.models import ModelHost
    from ui.state import RoundRequest, StudioState

    assert cli_main(["refine", "--preset", "tiny-sdxl", "--prompt", PROMPT, "--seed", "7", "--rounds", "1",
                     "--steps", "2", "--out", str(tmp_path / "cli"), "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    cli_record = json.loads((tmp_path / "cli" / "session.json").read_text())

    studio = Studio(ModelHost(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False)))
    request = RoundRequest.from_values(prompt=PROMPT, seed=7, steps=2)
    state = studio.refine(request, studio.generate(request, StudioState()), "")
    from PIL import Image

    for index in (0, 1):
        cli_image = Image.open(tmp_path / "cli" / f"round_{index}.png")
        assert np.array_equal(pixels(cli_image), pixels(state.rounds[index].image))
    assert cli_record["rounds"][1]["critique"] == state.rounds[1].critique
    assert cli_record["rounds"][1]["question"] == state.rounds[1].question


def test_a_model_switch_does_not_carry_the_automatic_offload_choice(tiny_root):
    from ui.models import ModelHost

    session = IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False)
    session.offload = True  # as if the automatic rule had chosen offload for this preset's size
    host = ModelHost(session, allow_switch=True)
    host.switch("tiny-sdxl-dpo", None, None)
    assert host.session.options.offload is None  # the next preset decides for itself


def test_round_features_are_not_written_to_the_record(tmp_path, fresh_session):
    record = fresh_session.run(PROMPT, seed=0, rounds=1, settings=SETTINGS)
    assert isinstance(record.rounds[0], Round) and record.rounds[0].image_features is not None
    record.save(tmp_path)
    saved = json.loads((tmp_path / "session.json").read_text())
    assert "image_features" not in saved["rounds"][0] and saved["rounds"][1]["question_source"] == "ours"


def test_cli_refine_records_each_rounds_scores(tmp_path, tiny_root, capsys):
    from img_core.cli.main import main as cli_main

    out = tmp_path / "scored"
    assert cli_main(["refine", "--preset", "tiny-sdxl", "--prompt", PROMPT, "--rounds", "1", "--steps", "1",
                     "--scorer", "vqascore", "--scorer", "clipscore", "--out", str(out), "--device", "cpu"]) == 0
    rounds = json.loads((out / "session.json").read_text())["rounds"]
    for made in rounds:
        assert set(made["scores"]) == {"vqascore", "clipscore"}
        assert 0.0 <= made["scores"]["vqascore"] <= 1.0 and 0.0 <= made["scores"]["clipscore"] <= 100.0
    assert "round 1: vqascore" in capsys.readouterr().out
    assert cli_main(["refine", "--preset", "tiny-sdxl", "--prompt", PROMPT, "--scorer", "beauty",
                     "--out", str(tmp_path / "x")]) == 2  # refused before any model loads
