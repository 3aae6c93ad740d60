"""The page's pure logic, without a browser or a model: score digits, the star and the stop rule on the
shown values, which guidance a round gets and says it got, the line of queued jobs, the examples."""

import dataclasses
import os
import threading

import pytest
from PIL import Image

from img_core.record import GUIDED_BY_EDIT, GUIDED_BY_MLLM, Round
from img_core.session import IMGSession, Stage, StageEvent
from ui import views
from ui.handlers import Studio
from ui.jobs import Jobs
from ui.models import ModelHost
from ui.state import GUIDANCE_CHOICES, StudioState, effective_guidance

IMAGE = Image.new("RGB", (8, 8))


def session_with(scores: list[float], edited_round: int | None = None) -> StudioState:
    state = StudioState().started(Round(0, IMAGE, "p", 0, "generated", scores={"vqascore": scores[0]}))
    for index, score in enumerate(scores[1:], start=1):
        mode = "dialogue" if index == edited_round else "question"
        made = Round(index, IMAGE, "p", 0, "refined", critique="c", guidance_mode=mode, scores={"vqascore": score})
        state = state.extended(made, edited=index == edited_round)
    return state


def test_scores_show_the_digits_that_tell_rounds_apart_and_the_change_from_round_0():
    state = session_with([0.47012, 0.47038, 0.47041])
    assert state.score_digits("vqascore") == 5  # at 4 digits rounds 1 and 2 both read 0.4704
    assert [state.shown_score(i, "vqascore") for i in range(3)] == [0.47012, 0.47038, 0.47041]
    card = views.card_score(state, 2, "vqascore")
    assert "vqascore 0.47041 (+0.00029 from round 0) · ★ best round" in card
    assert f'title="{views.SCORER_HOVERS["vqascore"][:20]}' in card.replace("&#x27;", "'")
    assert session_with([0.5, 0.61, 0.72]).score_digits("vqascore") == 3  # never fewer than 3
    assert views.scorer_hover("vqascore:img-llava-13b") == views.SCORER_HOVERS["vqascore"]


def test_the_star_and_the_stop_rule_use_the_shown_values(tiny_root):
    # 0.4700004 and 0.4700001 differ only past the 6th decimal: shown equal, so the earlier round is best
    # and Auto-refine stops (the later round is "not above" what the page shows for its base).
    state = session_with([0.4, 0.4700001, 0.4700004])
    assert state.shown_score(1, "vqascore") == state.shown_score(2, "vqascore") == 0.47
    assert state.best_index("vqascore") == 1
    studio = Studio(ModelHost(IMGSession.from_preset("tiny-sdxl", device="cpu")))
    reason = studio.score_stalled(state)
    assert reason and "its vqascore score 0.470000 is not above round 1's 0.470000" in reason
    assert studio.score_stalled(session_with([0.4, 0.47, 0.4712])) is None


def test_auto_guidance_steers_with_an_edit_and_keeps_question_mode_otherwise():
    assert GUIDANCE_CHOICES[0] == "auto" and set(GUIDANCE_CHOICES) >= {"question", "dialogue"}
    state, written = session_with([0.1]), "The horse is missing."
    assert effective_guidance("auto", "The horse is missing.", written) == "question"  # untouched
    assert effective_guidance("auto", "  The horse is missing. \n", written) == "question"
    assert effective_guidance("auto", "", written) == "question"
    assert effective_guidance("auto", "Make the horse brown.", written) == "dialogue"  # an edit steers
    assert effective_guidance("auto", "Make the horse brown.", "") == "dialogue"  # typed without Critique
    assert effective_guidance("question", "Make the horse brown.", written) == "question"  # forced
    assert effective_guidance("dialogue", "", written) == "dialogue"
    note = views.next_round_note(state, "dialogue", None, "Make the horse brown.", "auto")
    assert "your edited critique, which will steer it: “Make the horse brown.”" in note


def test_each_card_says_which_guidance_made_it():
    state = session_with([0.1, 0.2, 0.3], edited_round=1)
    assert views.guidance_source(state.rounds[0], False) is None
    assert "Guidance: guided by your edit" in views.card_markdown(state, 1, "vqascore")
    assert "Guidance: MLLM's own reading" in views.card_markdown(state, 2, "vqascore")
    # a restored session (the History, session.json) has no `edited`: the round's own record tells
    restored = StudioState(rounds=[dataclasses.replace(r, guidance_source=source) for r, source in
                                   zip(state.rounds, (None, GUIDED_BY_EDIT, GUIDED_BY_MLLM))], base=2)
    assert restored.edited == frozenset()
    assert "Guidance: guided by your edit" in views.card_markdown(restored, 1, "vqascore")
    assert "Guidance: MLLM's own reading" in views.card_markdown(restored, 2, "vqascore")



def test_a_card_shows_a_long_prompt_cut_to_its_limit():
    state = session_with([0.1, 0.2])
    long_prompt = "fox " * 500
    state = StudioState(rounds=[state.rounds[0], dataclasses.replace(state.rounds[1], prompt=long_prompt)], base=1)
    line = next(line for line in views.card_markdown(state, 1, "vqascore").split("\n\n") if line.startswith("Prompt:"))
    assert len(line) == len("Prompt: **") + views.CARD_PROMPT_CHARS and line.endswith("…*")


def test_a_job_stopped_while_it_waits_never_runs_and_the_line_moves_up():
    jobs = Jobs(studio=None, preparation=None)  # the line itself needs neither
    jobs.queued("a")
    jobs.queued("b")
    jobs.queued("c")
    assert [jobs.jobs_ahead(tab) for tab in "abc"] == [0, 1, 2]
    assert views.queue_line(1).startswith("⏳ Waiting in the queue: 1 job ahead of yours (position 2)")
    ticket = jobs._start("a")  # a runs
    assert jobs.jobs_ahead("b") == 1 and jobs.busy("a") and not jobs.waiting("a")
    assert jobs.stop("b") is True  # b waited: stopped at once
    assert not jobs.busy("b") and jobs.jobs_ahead("c") == 1
    stopped = jobs._start("b")  # its turn comes: it ends without running
    assert stopped.stop.is_set()
    jobs._finish(stopped)
    assert jobs.stop("a") is False and ticket.stop.is_set()  # a runs: it stops at its next step
    jobs._finish(ticket)
    assert not jobs.busy("a") and jobs.jobs_ahead("c") == 0


def test_a_running_api_call_counts_as_a_job_ahead():
    from ui.shutdown import tracked

    jobs = Jobs(studio=None, preparation=None)
    jobs.queued("a")
    assert jobs.jobs_ahead("a") == 0
    assert tracked(lambda: jobs.jobs_ahead("a"))() == 1  # an API call (a tracked model call) runs
    jobs.queued("b")
    assert tracked(lambda: jobs.jobs_ahead("b"))() == 2


def test_stop_reaches_a_waiting_job_from_another_thread():
    jobs = Jobs(studio=None, preparation=None)
    jobs.queued("tab")
    stopper = threading.Thread(target=jobs.stop, args=("tab",))
    stopper.start()
    stopper.join()
    assert jobs._start("tab").stop.is_set()


@pytest.mark.skipif(os.environ.get("GRADIO_CACHE_EXAMPLES") not in (None, ""), reason="GRADIO_CACHE_EXAMPLES set")
def test_examples_are_text_for_the_tiny_preset_and_lazily_cached_pictures_for_real_ones(tiny_root):
    from ui import build_demo

    tiny = build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu"), prepare_models=False).studio_ui
    assert tiny.examples.cache_examples is False and tiny.examples.fn is None
    real = build_demo(IMGSession.from_preset("sdxl", device="cpu"), prepare_models=False).studio_ui
    assert not real.host.is_loaded  # building the page loaded nothing
    assert real.examples.cache_examples == "lazy" and real.examples.fn is not None
    assert [o.elem_id for o in real.examples.outputs] == ["example-before", "example-after"]


def test_a_self_judged_score_says_so_on_the_card():
    image = Image.new("RGB", (8, 8))
    rounds = [Round(index=0, image=image, prompt="a cat", seed=0, source="generated", scores={"vqascore": 0.41}),
              Round(index=1, image=image, prompt="a cat", seed=0, source="refined", base_index=0,
                    scores={"vqascore": 0.52})]
    state = StudioState(rounds=rounds, base=1)
    plain = views.card_markdown(state, 1, "vqascore")
    flagged = views.card_markdown(state, 1, "vqascore", self_judged=True)
    assert views.SELF_JUDGED_NOTE not in plain
    assert views.SELF_JUDGED_NOTE in flagged and "grades its own advice" in flagged


def test_every_stage_of_the_core_has_its_words_on_the_page_and_no_other():
    assert set(views.STAGE_WORDS) == set(Stage)
    assert views.stage_line(StageEvent(Stage.QUEUED, round_index=2)) == "round 2 · waiting in the queue"
    assert views.stage_line(StageEvent(Stage.REGENERATE, round_index=1, step=3, total=8)) == (
        "round 1 · regenerating step 3/8")
    assert views.stage_line(StageEvent(Stage.STOPPING)).startswith("Stopping at the next step")
