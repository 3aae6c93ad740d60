"""ZeroGPU offline: each model action is one bounded GPU call, Auto-refine is one call per round with Stop
between them, and every call streams its stage events (steps, critique text) as it runs (ui/gpu.py).

The per-call code path is the one `gpu_task` builds on ZeroGPU (`streamed_call` over `stream_events`),
without `spaces.GPU` around it (it needs the Space's device API); the `spaces` package's own decorator and
duration rule are exercised where the package is installed."""

import dataclasses
import json
import threading
from importlib import resources

import pytest

from img_core.presets import PRESETS
from ui.gpu import (
    GPU_SECONDS,
    GPU_SIZE_GIB,
    MAX_GPU_SECONDS,
    gpu_seconds,
    gpu_size,
    gpu_task,
    stream_events,
    streamed_call,
    zero_gpu_precision,
)
from ui.handlers import Studio
from ui.jobs import StopRequested, run_in_worker
from ui.models import ModelHost
from ui.state import RoundRequest, StudioState

PROMPT = "A green banana and a brown horse."


def request() -> RoundRequest:
    return RoundRequest.from_values(prompt=PROMPT, seed=7, steps=2, guidance_mode="question")


class CountedGPUCalls:
    """The streamed GPU call of one Studio method, counting how often it is entered (one GPU call each)."""

    def __init__(self, method):
        self.calls = 0
        self.events = stream_events(method)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.events(*args, **kwargs)


@pytest.fixture
def zero_gpu_studio(tiny_sdxl_session):
    """A Studio whose refine and critique run as ZeroGPU would run them (one streamed call each)."""
    studio = Studio(ModelHost(tiny_sdxl_session), scorer=None)
    refine_calls, critique_calls = CountedGPUCalls(studio._refine), CountedGPUCalls(studio._critique)
    studio.refine = streamed_call(studio._refine, refine_calls)
    studio.critique = streamed_call(studio._critique, critique_calls)
    return studio, refine_calls, critique_calls


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_every_call_asks_for_a_bounded_duration_and_a_slice_that_fits(preset_name):
    preset = PRESETS[preset_name]
    for action in ("generate", "critique", "refine"):
        seconds = gpu_seconds(action, preset)
        assert 0 < seconds <= MAX_GPU_SECONDS <= 120
    assert gpu_size(preset) == "large"  # every preset fits the 48 GB default slice at its defaults
    if not preset.is_tiny:  # and the MLLM's precision follows that slice
        expected = "none" if preset.family == "sdxl" else "bnb-8bit"
        assert zero_gpu_precision(preset).quantization == expected


def test_a_preset_too_large_for_the_half_gpu_asks_for_the_whole_one():
    bf16_flux = dataclasses.replace(PRESETS["flux-dev"], resident_gib=48.3)  # README table: bf16 FLUX + nf4 LLaVA
    assert gpu_size(bf16_flux) == "xlarge"
    assert zero_gpu_precision(bf16_flux).quantization == "none"  # 96 GB: room for bf16
    assert GPU_SIZE_GIB["large"] == pytest.approx(42.0, abs=0.1)
    assert max(max(actions.values()) for actions in GPU_SECONDS.values()) == MAX_GPU_SECONDS


def test_auto_refine_is_one_gpu_call_per_round_and_streams_each_rounds_steps(zero_gpu_studio):
    studio, refine_calls, _ = zero_gpu_studio
    base = studio.generate(request(), StudioState())
    events = []
    made = list(studio.auto_refine(request(), base, "", 3, stop_when_flat=False, on_stage=events.append))
    assert refine_calls.calls == 3 and len(made) == 3
    assert [state.base_round().index for state, _ in made] == [1, 2, 3]
    for index in (1, 2, 3):  # each call's diffusion steps reached the caller while the call ran
        steps = [e for e in events if e.round_index == index and e.stage == "regenerate" and e.step is not None]
        assert [e.step for e in steps][-1] == steps[-1].total == 2


def test_the_critique_streams_token_by_token_out_of_its_gpu_call(zero_gpu_studio):
    studio, _, critique_calls = zero_gpu_studio
    base = studio.generate(request(), StudioState())
    events = []
    text = studio.critique(request(), base, events.append)
    streamed = [e.text for e in events if e.stage == "critique" and e.text is not None]
    assert critique_calls.calls == 1 and len(streamed) >= 2
    assert all(len(a) <= len(b) for a, b in zip(streamed, streamed[1:]))  # grows token by token
    assert streamed[-1].strip() == text.strip()


def test_stop_ends_auto_refine_between_gpu_calls(zero_gpu_studio):
    studio, refine_calls, _ = zero_gpu_studio
    base = studio.generate(request(), StudioState())
    stop = threading.Event()
    made = []

    def produce(on_stage):
        for state, reason in studio.auto_refine(request(), base, "", 4, stop_when_flat=False, on_stage=on_stage):
            made.append(state)
            stop.set()  # Stop clicked while round 1's result is shown
            yield state, reason

    with pytest.raises(StopRequested):
        for _ in run_in_worker(produce, stop):
            pass
    assert len(made) == 1 and refine_calls.calls <= 2  # round 2's call ended at its first event, no more calls
    assert made[0].base_round().index == 1


def test_errors_inside_a_gpu_call_reach_the_caller_unchanged(zero_gpu_studio):
    studio, _, critique_calls = zero_gpu_studio
    from img_core.errors import IMGError

    with pytest.raises(IMGError):
        studio.critique(request(), StudioState())  # no round to critique: the user's mistake, one message
    assert critique_calls.calls == 1


def test_without_zero_gpu_the_decorator_only_tracks_the_call_for_a_graceful_stop(monkeypatch):
    import inspect

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    events = []

    def refine(request, state, critique, on_stage=None):
        on_stage("step")
        return "made"

    decorated = gpu_task("refine", PRESETS["sdxl"])(refine)
    assert inspect.unwrap(decorated) is refine  # no GPU call in between: ui.shutdown.tracked only
    assert decorated(None, None, None, on_stage=events.append) == "made"
    assert events == ["step"]


def test_the_spaces_decorator_and_its_duration_rule_accept_our_calls(monkeypatch):
    """The `spaces` package (PyPI) where installed: its decorator is a no-op off ZeroGPU, and its own
    duration rule gives every call at most MAX_GPU_SECONDS x the large slice's factor of real time."""
    spaces = pytest.importorskip("spaces")
    from spaces.zero.wrappers import process_duration, static_duration

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def generate(request, state, on_stage=None):
        return "made"

    preset = PRESETS["flux-dev"]
    assert spaces.GPU(duration=gpu_seconds("generate", preset), size=gpu_size(preset))(generate) is generate
    duration = process_duration(static_duration(gpu_seconds("refine", preset), request(), StudioState()))
    assert duration.total_seconds() == gpu_seconds("refine", preset) <= MAX_GPU_SECONDS
    configs = json.loads(resources.files("spaces.zero").joinpath("configs.json").read_text())
    half_card = next(config for config in configs if config["xlarge_threshold"])  # RTX Pro 6000: large = half
    assert half_card["xlarge_threshold"] / 1024**3 == pytest.approx(GPU_SIZE_GIB["large"])
    assert half_card["memory"] / 1024**3 == pytest.approx(GPU_SIZE_GIB["xlarge"])
