"""The session's core contracts: one cache rule for every MLLM and tiny-model path, the kept Critique
reading, edits that steer by default, loading reported as stages, and one prompt check per click.

Every model here is a real tiny model loaded through the same loaders as the real ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from img_core.mllm import resolve_spec
from img_core.mllm.converted import write_completion_marker
from img_core.paths import CACHE_ENV, TINY_DIR_ENV, cache_root, tiny_models_root
from img_core.session import IMGSession
from img_core.settings import ModelOptions, RoundSettings
from img_core.tiny.models import TINY_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- one cache rule, read at call time


@pytest.fixture
def cache_with_img_llava(tmp_path, monkeypatch, tiny_root) -> Path:
    """$IMG_STUDIO_CACHE set to a fresh folder (and no $IMG_TINY_DIR) holding, where the IMG LLaVA goes, a
    complete converted LLaVA checkpoint (the tiny one, with its completion marker), and the tiny models
    (linked to the ones this test run built, so nothing is rebuilt)."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_root / "tiny-llava", cache / "img-llava-13b-hf")
    write_completion_marker(cache / "img-llava-13b-hf")
    (cache / "tiny").mkdir()
    (cache / "tiny" / TINY_VERSION).symlink_to(tiny_root, target_is_directory=True)
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv(TINY_DIR_ENV, raising=False)
    return cache


def test_the_cache_rule_is_read_when_called_not_at_import(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv(TINY_DIR_ENV, raising=False)
    home_cache = Path("~/.cache/img-studio").expanduser()
    assert resolve_spec("img-llava-13b").model_id == str(home_cache / "img-llava-13b-hf")
    assert tiny_models_root() == home_cache / "tiny"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    assert resolve_spec("img-llava-13b").model_id == str(tmp_path / "img-llava-13b-hf")
    assert tiny_models_root() == tmp_path / "tiny"
    monkeypatch.setenv(TINY_DIR_ENV, str(tmp_path / "elsewhere"))  # an explicit tiny folder still wins
    assert tiny_models_root() == tmp_path / "elsewhere"


def test_every_path_naming_the_img_llava_resolves_under_the_cache(cache_with_img_llava):
    from PIL import Image

    from img_core.evaluation.scorers import load_scorer
    from trainer.finetune_mllm import base_spec

    cache = cache_with_img_llava
    # the session (and evaluate, which loads the session's MLLM alone for vqascore the same way)
    session = IMGSession(ModelOptions(preset="tiny-sdxl", mllm="img-llava-13b", device="cpu"),
                         show_progress_bars=False)
    session.load(["mllm"])
    assert session.loaded_parts == ("mllm",)
    assert Path(session.critic.spec.model_id) == cache / "img-llava-13b-hf"
    assert Path(session.tiny_root).parent == cache / "tiny"  # the tiny models too, with no $IMG_TINY_DIR
    # evaluate's and the app's separate judge: vqascore:<mllm>
    judge = load_scorer("vqascore:img-llava-13b", device="cpu", tiny_root=session.tiny_root)
    value = judge.score([Image.new("RGB", (32, 32), (200, 30, 30))], ["a red square"])[0]
    assert 0.0 <= value <= 1.0
    assert Path(judge.critic.spec.model_id) == cache / "img-llava-13b-hf"
    # fine-tuning's base model
    assert Path(base_spec("img-llava-13b").model_id) == cache / "img-llava-13b-hf"
    assert Path(base_spec("tiny-llava").model_id).parent.parent == cache / "tiny"


def test_an_unprepared_img_llava_is_looked_for_in_the_cache_it_names(tmp_path, monkeypatch):
    from img_core.errors import WeightsNotFoundError
    from img_core.mllm.loading import load_mllm

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as raised:
        load_mllm(resolve_spec("img-llava-13b"))
    assert str(tmp_path / "img-llava-13b-hf") in str(raised.value)


# ------------------------------------------------------------------------- Critique keeps its reading

PROMPT = "A green banana and a brown horse."


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def new_session() -> IMGSession:
    """A session of its own: caches start empty, forward hooks do not leak into other tests."""
    return IMGSession(ModelOptions(preset="tiny-sdxl", device="cpu"), show_progress_bars=False).load()


def count_vision_tower_calls(session: IMGSession) -> list[int]:
    """A counter of forward calls of the session MLLM's vision tower (one per look at an image)."""
    calls = [0]

    def count(module, args, output) -> None:
        calls[0] += 1

    session.critic.model.model.vision_tower.register_forward_hook(count)
    return calls


@pytest.fixture(scope="module")
def question_mode_image():
    """What Refine in question mode makes from round 0 without a prior Critique (the release's path)."""
    session = new_session()
    base = session.generate(PROMPT, 0, RoundSettings(steps=2))
    refined = session.refine(base, PROMPT, 0, None, RoundSettings(steps=2, guidance_mode="question"))
    return base, refined


def test_critique_then_refine_runs_the_vision_tower_once_and_makes_the_same_image(question_mode_image):
    expected_base, expected = question_mode_image
    session = new_session()
    base = session.generate(PROMPT, 0, RoundSettings(steps=2))
    assert np.abs(pixels(base.image) - pixels(expected_base.image)).max() == 0
    calls = count_vision_tower_calls(session)
    critique = session.critique(base, PROMPT, seed=0)
    assert calls[0] == 1 and base.reading is not None and base.reading.critique == critique
    refined = session.refine(base, PROMPT, 0, critique, RoundSettings(steps=2, guidance_mode="question"))
    assert calls[0] == 1  # the guidance came from the critique's prefill
    assert refined.critique == expected.critique == critique
    assert refined.question == expected.question
    assert np.abs(pixels(refined.image) - pixels(expected.image)).max() == 0
    # other conditions (another seed draws another question) read again
    session.refine(base, PROMPT, 1, critique, RoundSettings(steps=2, guidance_mode="question"))
    assert calls[0] == 2
    assert "reading" not in refined.to_dict()


# ------------------------------------------------------------------------- edits steer by default


def test_with_default_settings_edits_steer_and_an_untouched_critique_keeps_question_mode(
    question_mode_image, tmp_path
):
    from img_core.record import GUIDED_BY_EDIT, GUIDED_BY_MLLM, SessionRecord
    from img_core.settings import DEFAULT_GUIDANCE_MODE

    assert RoundSettings().guidance_mode == DEFAULT_GUIDANCE_MODE == "auto"
    expected_base, expected = question_mode_image
    session = new_session()
    defaults = RoundSettings(steps=2)
    base = session.generate(PROMPT, 0, defaults)
    critique = session.critique(base, PROMPT, seed=0)
    untouched = session.refine(base, PROMPT, 0, critique, defaults)
    assert (untouched.guidance_mode, untouched.guidance_source) == ("question", GUIDED_BY_MLLM)
    assert np.abs(pixels(untouched.image) - pixels(expected.image)).max() == 0
    first = session.refine(base, PROMPT, 0, "The banana should be bright yellow and much larger.", defaults)
    second = session.refine(base, PROMPT, 0, "Put a red saddle on the horse; make the sky stormy.", defaults)
    for edited in (first, second):
        assert (edited.guidance_mode, edited.guidance_source) == ("dialogue", GUIDED_BY_EDIT)
        assert edited.guided_by_edit and not untouched.guided_by_edit
    assert np.abs(pixels(first.image) - pixels(second.image)).max() > 0
    assert np.abs(pixels(first.image) - pixels(untouched.image)).max() > 0
    # "question" still forces the release's guidance: the edit is recorded but does not steer
    forced = session.refine(base, PROMPT, 0, first.critique, RoundSettings(steps=2, guidance_mode="question"))
    assert forced.guidance_source == GUIDED_BY_MLLM and forced.critique == first.critique
    assert np.abs(pixels(forced.image) - pixels(expected.image)).max() == 0
    # the record says which reading guided each round
    SessionRecord(PROMPT, 0, "tiny-sdxl", [base, untouched, first]).save(tmp_path)
    saved = json.loads((tmp_path / "session.json").read_text())
    assert [r["guidance_source"] for r in saved["rounds"]] == [None, GUIDED_BY_MLLM, GUIDED_BY_EDIT]
    assert saved["rounds"][2]["settings"]["guidance_mode"] == "auto"  # the setting; the mode it picked:
    assert saved["rounds"][2]["guidance_mode"] == "dialogue"


# ------------------------------------------------------------------------- loading reports its own stages


def test_load_reports_step_k_of_n_over_the_parts_it_loads_and_unload_frees_them(tiny_root):
    from img_core.session import LOAD_STEPS, Stage

    session = IMGSession(ModelOptions(preset="tiny-sdxl", device="cpu"), show_progress_bars=False)
    events = []
    session.load(["mllm"], on_stage=events.append)
    assert session.loaded_parts == ("mllm",) and not session.is_loaded
    assert [(e.stage, e.step, e.total) for e in events] == [(Stage.LOAD, 1, 2), (Stage.LOAD, 2, 2), (Stage.LOAD, 2, 2)]
    events.clear()
    session.load(on_stage=events.append)  # the rest: the pipeline and the aligner
    assert session.is_loaded and [(e.step, e.total) for e in events] == [(1, 2), (2, 2), (2, 2)]
    assert "pipeline" in events[0].message and "Aligner" in events[1].message
    assert LOAD_STEPS == ("prepare", "diffusion", "mllm", "aligner")
    events.clear()
    session.load(on_stage=events.append)
    assert events == []  # nothing left to load
    session.unload(["diffusion", "aligner"])
    assert session.loaded_parts == ("mllm",) and session.backend is None and session.aligner is None
    with pytest.raises(Exception, match="session parts"):
        session.unload(["everything"])
    assert {stage.value for stage in Stage} >= {"load", "generate", "critique", "guidance", "image_features",
                                                "align", "regenerate", "score", "stopping", "queued", "done"}


# ------------------------------------------------------------------------- the prompt is checked once per click


def test_a_click_checks_the_prompt_once(monkeypatch):
    import img_core.backends.base
    import img_core.session
    import ui.state
    from img_core.settings import CheckedPrompt, check_prompt
    from ui.handlers import Studio
    from ui.models import ModelHost
    from ui.state import RoundRequest, StudioState

    session = new_session()
    counts = {"characters": 0, "tokens": 0}

    def counting_check_prompt(prompt):
        counts["characters"] += not isinstance(prompt, CheckedPrompt)  # a CheckedPrompt passes unchecked
        return check_prompt(prompt)

    for module in (ui.state, img_core.session, img_core.backends.base):
        monkeypatch.setattr(module, "check_prompt", counting_check_prompt)
    token_check = session.backend.check_prompt  # the real one: a tokenizer pass per text encoder

    def counting_token_check(prompt):
        counts["tokens"] += 1
        return token_check(prompt)

    monkeypatch.setattr(session.backend, "check_prompt", counting_token_check)
    studio = Studio(ModelHost(session), scorer=None)

    def click(action):
        counts.update(characters=0, tokens=0)
        result = action(RoundRequest.from_values(prompt="  " + PROMPT, seed=0, steps=2))
        return result, dict(counts)

    state, checks = click(lambda request: studio.generate(request, StudioState()))
    assert checks == {"characters": 1, "tokens": 1}
    state, checks = click(lambda request: studio.refine(request, state, ""))
    assert checks == {"characters": 1, "tokens": 1} and len(state.rounds) == 2
    states, checks = click(lambda request: list(studio.auto_refine(request, state, "", 3, False)))
    assert checks == {"characters": 1, "tokens": 1} and len(states[-1][0].rounds) == 5
    counts.update(characters=0, tokens=0)
    record = session.run(PROMPT, 0, rounds=2, settings=RoundSettings(steps=2))
    assert counts == {"characters": 1, "tokens": 1} and len(record.rounds) == 3
