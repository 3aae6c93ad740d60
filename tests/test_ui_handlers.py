"""The app's handlers, state and views in-process on the tiny preset (no server, no browser)."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from img_core.errors import IMGError, InvalidInputError
from img_core.session import IMGSession, StageEvent
from ui import views
from ui.handlers import ModelPreparation, Studio
from ui.jobs import Produced, StopRequested, run_in_worker
from ui.models import ModelHost, compatible_mllms
from ui.state import RoundRequest, StudioState

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A green banana and a brown horse."


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def request(**overrides) -> RoundRequest:
    values = {"prompt": PROMPT, "seed": 7, "steps": 2, "guidance_mode": "dialogue"} | overrides
    return RoundRequest.from_values(**values)


@pytest.fixture(scope="module")
def studio(tiny_sdxl_session) -> Studio:
    return Studio(ModelHost(tiny_sdxl_session))


@pytest.fixture(scope="module")
def generated(studio) -> StudioState:
    return studio.generate(request(), StudioState())


def test_request_reads_widget_values_and_refuses_bad_ones():
    made = RoundRequest.from_values(prompt="  a cat ", seed=3.0, steps=4.0, guidance_scale=5, aligner_passes=2.0)
    settings = made.settings
    assert (made.prompt, made.seed, settings.steps, settings.aligner_passes) == ("a cat", 3, 4, 2)
    assert (settings.guidance_scale, settings.guidance_mode) == (5, "auto")  # settings.DEFAULT_GUIDANCE_MODE
    long = RoundRequest.from_values(prompt="fox " * 1000, seed=0)  # cut with a warning, never refused
    assert len(long.prompt) <= 2000 and "were cut" in long.warnings[0]
    for values, message in [
        ({"prompt": "  ", "seed": 0}, "prompt is empty"),
        ({"prompt": 42, "seed": 0}, "prompt must be text"),
        ({"prompt": "a", "seed": None}, "seed is missing"),
        ({"prompt": "a", "seed": 1.5}, "seed must be a whole number"),
        ({"prompt": "a", "seed": True}, "seed must be"),
        ({"prompt": "a", "seed": "7"}, "seed must be"),
        ({"prompt": "a", "seed": -1}, "seed must be"),
        ({"prompt": "a", "seed": 0, "guidance_mode": "shout"}, "guidance mode"),
        ({"prompt": "a", "seed": 0, "ip_scale": 3}, "ip scale"),
        ({"prompt": "a", "seed": 0, "steps": 2.5}, "steps must be a whole number"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            RoundRequest.from_values(**values)


def test_buttons_that_cannot_run_are_disabled(generated):
    empty = views.button_states(StudioState(), busy=False)
    assert empty["generate"] and empty["use_upload"]
    assert not any(empty[name] for name in ("critique", "refine", "auto_refine", "download", "reset", "stop"))
    busy = views.button_states(generated, busy=True)
    assert [name for name, can in busy.items() if can] == ["stop", "download"], "a job: Stop, and the rounds so far"
    preparing = views.button_states(generated, busy=False, preparing=True)
    assert not any(preparing[name] for name in views.NEEDS_MODELS) and preparing["download"] and preparing["reset"]
    assert views.button_label("generate", "2/4") == "Generate · preparing models (2/4)"
    assert views.button_label("reset", "2/4") == "Reset" and views.button_label("generate", None) == "Generate"


def test_models_load_once_per_process(tiny_root):
    host = ModelHost(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False))
    assert not host.is_loaded and "not loaded yet" in host.status_line()
    events = []
    session = host.loaded_session(events.append)  # the session's own Stage.LOAD events, step k of n
    backend, seconds = session.backend, host.load_seconds
    assert host.is_loaded and "loaded in" in host.status_line()
    assert [(event.stage, event.step, event.total) for event in events] == [("load", k, 4) for k in (1, 2, 3, 4, 4)]
    assert "tiny-llava" in events[0].message and events[-1].message == "models loaded"
    assert host.loaded_session() is session and session.backend is backend and host.load_seconds == seconds


def test_switching_models_replaces_them_and_survives_a_failure(tiny_root):
    assert compatible_mllms("sdxl") == ["img-llava-13b", "llava-1.5-13b"]
    assert compatible_mllms("tiny-flux") == ["tiny-llava", "tiny-qwen"]
    host = ModelHost(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False), allow_switch=True)
    assert not host.switch("tiny-sdxl", None, "none") and not host.is_loaded, "same settings: nothing to do"
    with pytest.raises(InvalidInputError, match="quantization"):
        host.switch("tiny-flux", None, "int3")
    assert host.preset.name == "tiny-sdxl" and host.quantization == "none" and not host.is_loaded
    assert host.switch("tiny-flux", None, "none")
    assert host.is_loaded and host.session.mllm_name == "tiny-qwen" and "**tiny-flux**" in host.status_line()


def test_generate_critique_refine_from_any_round_and_download(studio, generated, tmp_path):
    state = generated
    assert len(state.rounds) == 1 and state.base == 0 and state.rounds[0].source == "generated"
    critique = studio.critique(request(), state)
    assert isinstance(critique, str) and critique.strip()

    edited = "Make the horse brown and put it next to a green banana."
    first = studio.refine(request(), state, edited)
    assert len(state.rounds) == 1, "handlers return new states; the old one is untouched"
    one = first.rounds[1]
    assert (one.index, one.base_index, one.critique, one.source) == (1, 0, edited, "refined")
    assert first.base == 1 and np.abs(pixels(one.image) - pixels(state.rounds[0].image)).mean() > 0

    plain = studio.refine(request(), state, critique)
    assert np.abs(pixels(plain.rounds[1].image) - pixels(one.image)).mean() > 0, "the edit changed the result"

    events = []
    second = studio.refine(request(), first, "", events.append)
    assert second.rounds[2].base_index == 1 and second.rounds[2].critique  # empty: the MLLM critiqued round 1
    lines = list(dict.fromkeys(views.stage_line(event) for event in events if event.step is None))
    assert lines[:2] == ["round 2 · critique", "round 2 · encoding the base image"], lines
    assert lines[-2:] == ["round 2 · done", "round 2 · scoring (vqascore)"]
    steps = [views.stage_line(e, auto=(1, 4)) for e in events if e.stage == "regenerate" and e.step]
    assert steps == ["round 2 of 4 · regenerating step 1/2", "round 2 of 4 · regenerating step 2/2"]
    streamed = [e.text for e in events if e.text is not None]
    assert len(streamed) >= 2 and streamed[-1] == second.rounds[2].critique, "the critique streams token by token"
    assert {"critique", "image_features", "align", "regenerate"} <= set(second.rounds[2].seconds)
    assert np.abs(pixels(second.rounds[2].image) - pixels(one.image)).mean() > 0

    branched = studio.refine(request(), studio.select(second, 0), edited)  # clicking round 0 makes it the base
    assert branched.rounds[3].base_index == 0 and branched.base == 3
    assert np.array_equal(pixels(branched.rounds[3].image), pixels(one.image)), "same base, critique and seed"

    titles = [views.card_title(branched, index) for index in range(4)]
    assert [title.split(" · ")[:3] for title in titles] == [
        ["Round 0", "generated", "seed 7"], ["Round 1", "from round 0", "seed 7"],
        ["Round 2", "from round 1", "seed 7"], ["Round 3", "from round 0", "seed 7"],
    ]  # fmt: skip
    assert views.card_critique(branched, 0) is None and "Make the horse brown" in views.card_critique(branched, 3)[1]
    scores = [item.scores["vqascore"] for item in branched.rounds]
    assert all(0.0 <= value <= 1.0 for value in scores), scores
    best = branched.best_index("vqascore")
    assert scores[best] == max(scores) and "★ best round" in views.card_markdown(branched, best, "vqascore")
    assert "▶ base of the next round" in views.card_markdown(branched, 3, "vqascore")

    archive = studio.export(branched)
    with zipfile.ZipFile(archive) as bundle:
        assert sorted(bundle.namelist()) == ["round_0.png", "round_1.png", "round_2.png", "round_3.png", "session.json"]
        saved = json.loads(bundle.read("session.json"))
        restored = Image.open(bundle.open("round_3.png"))
        assert np.array_equal(pixels(restored), pixels(branched.rounds[3].image))
    assert saved["preset"] == "tiny-sdxl" and saved["prompt"] == PROMPT and saved["seed"] == 7
    assert [r["base_index"] for r in saved["rounds"]] == [None, 0, 1, 0]
    assert saved["rounds"][1]["critique"] == edited and saved["rounds"][1]["guidance_mode"] == "dialogue"


def test_question_mode_ignores_the_critique_text(studio, generated):
    question = request(guidance_mode="question")
    a = studio.refine(question, generated, "The horse is missing.")
    b = studio.refine(question, generated, "Something else entirely.")
    assert np.array_equal(pixels(a.rounds[1].image), pixels(b.rounds[1].image))
    assert "for reading only" in views.CRITIQUE_NOTES["question"]


def test_auto_refine_yields_every_round_and_stops_when_the_score_stops_improving(studio, generated):
    steps = list(studio.auto_refine(request(), generated, "", 3, stop_when_flat=False))
    assert [len(state.rounds) for state, _ in steps] == [2, 3, 4] and not any(reason for _, reason in steps)
    last = steps[-1][0]
    assert [r.base_index for r in last.rounds] == [None, 0, 1, 2] and last.base == 3
    with pytest.raises(InvalidInputError, match="auto-refine rounds must be from 1 to"):
        list(studio.auto_refine(request(), generated, "", 0))

    # the rule on the scores just made: stop after the first round whose score is not above its base's
    scores = [r.scores["vqascore"] for r in last.rounds]
    first_flat = next((k for k in (1, 2) if scores[k] <= scores[k - 1]), None)
    ruled = list(studio.auto_refine(request(), generated, "", 3, stop_when_flat=True))
    assert [state.rounds[-1].scores["vqascore"] for state, _ in ruled] == scores[1: len(ruled) + 1]
    assert len(ruled) == (first_flat if first_flat is not None else 3)
    if first_flat is not None:
        assert f"stopped after round {first_flat}" in ruled[-1][1]

    # a flat score by construction: the same round scored equal to its base
    flat = last.with_base(1).extended(dataclasses.replace(last.rounds[1], scores={"vqascore": scores[1]}))
    assert "is not above round 1's" in studio.score_stalled(flat)
    better = last.with_base(1).extended(dataclasses.replace(last.rounds[1], scores={"vqascore": scores[1] + 0.1}))
    assert studio.score_stalled(better) is None


def test_start_from_an_uploaded_image(studio, generated):
    state = studio.start_from_image(Image.new("RGBA", (96, 80), (10, 200, 30, 255)), request(), StudioState())
    assert state.rounds[0].source == "uploaded" and state.rounds[0].image.mode == "RGB"
    assert "your image" in views.card_title(state, 0) and "vqascore" in state.rounds[0].scores
    # with rounds on the page, an upload starts a new session (as Generate does): the old one, under its
    # own id, stays as it was for the History
    rounds_before = list(generated.rounds)
    over = studio.start_from_image(Image.new("RGB", (64, 64), (200, 10, 30)), request(), generated)
    assert len(over.rounds) == 1 and over.base == 0 and over.rounds[0].source == "uploaded"
    assert over.session_id not in ("", generated.session_id, state.session_id)
    assert generated.rounds == rounds_before and generated.session_id
    with pytest.raises(InvalidInputError, match="no image was uploaded"):
        studio.start_from_image(None, request(), StudioState())


def test_user_mistakes_are_img_errors_for_the_page_and_gradio_errors_for_the_api(studio, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(InvalidInputError, match="no image yet"):
        studio.critique(request(), StudioState())
    with pytest.raises(InvalidInputError, match="no image yet"):
        studio.refine(request(), StudioState(), "")
    with pytest.raises(IMGError, match="not an image"):
        studio.start_from_image(str(not_image), request(), StudioState())
    with pytest.raises(gr.Error, match="nothing to download"):
        studio.export(StudioState())
    with pytest.raises(gr.Error, match="no round 5"):
        studio.select(StudioState(), 5)
    with pytest.raises(gr.Error, match="prompt is empty"):
        studio.api_generate("", 0)
    with pytest.raises(gr.Error, match="seed"):
        studio.api_generate(PROMPT, None)
    with pytest.raises(gr.Error, match="no image was given"):
        studio.api_critique(None, PROMPT)
    with pytest.raises(gr.Error, match="not an image"):
        studio.api_refine(str(not_image), PROMPT, "", 0)


def test_api_functions_return_images_and_text(studio, tmp_path):
    image = studio.api_generate(PROMPT, 3)
    assert image.size == (64, 64)
    path = tmp_path / "round0.png"
    image.save(path)
    assert studio.api_critique(str(path), PROMPT).strip()
    refined = studio.api_refine(str(path), PROMPT, "Add a brown horse.", 3)
    assert np.abs(pixels(refined) - pixels(image)).mean() > 0


def test_build_demo_loads_nothing_and_names_the_endpoints(tiny_root):
    from ui import build_demo

    session = IMGSession.from_preset("tiny-sdxl", device="cpu")
    demo = build_demo(session, prepare_models=False)
    assert not session.is_loaded
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"generate", "critique", "refine", "ui_generate", "ui_refine", "ui_auto_refine"} <= names
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    assert by_id["tiny-banner"].visible and "Tiny random models" in by_id["tiny-banner"].value
    assert not by_id["models-panel"].visible, "no model switch without --allow-model-switch"
    assert build_demo(session, allow_model_switch=True, prepare_models=False).studio_ui.allow_model_switch
    assert by_id["generate-btn"].value == "Generate" and by_id["generate-btn"].interactive  # the first page prepares
    assert by_id["guidance-mode"].value == "auto"


def test_the_app_flag_sets_the_pages_default_guidance_mode(tiny_root):
    import app as app_module
    from ui import build_demo

    args = app_module.parse_args(["--guidance-mode", "dialogue"])
    demo = build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu"), prepare_models=False,
                      guidance_mode=args.guidance_mode)  # fmt: skip
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    assert by_id["guidance-mode"].value == "dialogue"
    assert app_module.parse_args([]).guidance_mode == "auto"
    with pytest.raises(SystemExit):
        app_module.parse_args(["--guidance-mode", "loud"])


def test_jobs_run_beside_the_page_stream_their_stages_and_stop(studio, generated):
    batches = list(run_in_worker(lambda on_stage: [studio.refine(request(), generated, "", on_stage)]))
    items = [item for batch in batches for item in batch]
    assert isinstance(items[-1], Produced) and len(items[-1].value.rounds) == 2
    assert all(isinstance(item, StageEvent) for item in items[:-1]) and len(items) > 5

    with pytest.raises(InvalidInputError, match="no image yet"):  # errors reach the page's thread
        list(run_in_worker(lambda on_stage: [studio.refine(request(), StudioState(), "", on_stage)]))

    stop = threading.Event()
    kept = []
    with pytest.raises(StopRequested):
        for batch in run_in_worker(lambda on_stage: studio.auto_refine(request(), generated, "", 5, False, on_stage),
                                   stop):  # fmt: skip
            kept += [item.value[0] for item in batch if isinstance(item, Produced)]
            if kept:
                stop.set()  # Stop after the first round: the next stage event ends the job
    assert 1 <= len(kept) < 5 and len(kept[-1].rounds) == len(kept) + 1


def test_models_prepare_in_the_background_and_a_failure_is_kept_as_a_message(tiny_root, tmp_path):
    from ui import build_demo

    broken = IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False,
                                    aligner=str(tmp_path / "missing-aligner"))  # fmt: skip
    page = build_demo(broken).studio_ui  # starts preparing at once, in the background
    preparation = page.preparation
    assert isinstance(preparation, ModelPreparation) and preparation.running and preparation.step_text is not None
    assert "Preparing models (" in page._status_text(None)
    assert not preparation.wait(120) and preparation.error and "missing-aligner" in preparation.error
    assert preparation.step == 4 and not preparation.running and preparation.step_text is None
    status = page._status_text(None)  # what the page shows: the message, and that a click retries
    assert "could not be prepared" in status and "missing-aligner" in status and "try again" in status
    buttons = page._button_updates(StudioState(), busy=False)
    assert buttons[page.buttons["generate"]]["interactive"] and buttons[page.buttons["generate"]]["value"] == "Generate"


def test_a_shutdown_stops_the_model_preparation_at_its_next_load_step(tiny_root, monkeypatch):
    """The background preparation is a model call like a click's: SIGTERM's wait counts it, and it stops
    at its next load step with the shutdown message (the app then exits 0, not under a thread in torch)."""
    from ui import shutdown

    session = IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False)
    preparation = ModelPreparation(ModelHost(session))
    running, note = [], preparation.note

    def note_then_sigterm(event: StageEvent) -> None:  # SIGTERM arrives during the first load step
        running.append(shutdown.running_calls())
        note(event)
        shutdown.request_stop()

    monkeypatch.setattr(preparation, "note", note_then_sigterm)
    try:
        preparation.start()
        assert not preparation.wait(120)
        assert running == [1]  # counted while it ran; stopped before the second step was reported
        assert preparation.error == shutdown.SHUTDOWN_MESSAGE and not preparation.ready
        assert shutdown.running_calls() == 0 and shutdown.wait_until_idle(grace=1.0, quiet=0.1)
    finally:
        shutdown._stopping.clear()


def test_importing_app_loads_nothing_and_binds_localhost():
    code = (
        "import gc, sys, app\n"
        "from img_core.session import IMGSession\n"
        "assert not [o for o in gc.get_objects() if isinstance(o, IMGSession)]\n"
        "assert 'diffusers' not in sys.modules, 'importing app imported diffusers'\n"
        "args = app.parse_args([])\n"
        "print(args.host, args.port, args.preset, args.share)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_SERVER_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["127.0.0.1", "7860", "None", "False"]
