"""Unit tests of img_core/settings.py: limits, round settings, prompt and seed checks, the argparse helpers
and the model options read from the environment. No model is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from img_core.errors import InvalidInputError
from img_core.presets import get_preset
from img_core.settings import (
    DEFAULT_GUIDANCE_MODE,
    DEFAULT_MAX_CRITIQUE_TOKENS,
    GUIDANCE_MODES,
    LIMITS,
    MAX_PROMPT_CHARS,
    MLLM_GUIDANCE_MODES,
    MODEL_ENVIRONMENT,
    CheckedPrompt,
    ModelOptions,
    RoundSettings,
    add_model_arguments,
    add_round_arguments,
    check_prompt,
    check_rounds,
    check_seed,
    model_options_from_args,
    round_settings_from_args,
)


def test_every_limit_is_a_sane_range_that_accepts_its_ends_and_refuses_beyond():
    for name, limit in LIMITS.items():
        assert limit.low < limit.high and 0 < limit.step <= limit.high - limit.low, name
        assert limit.check(name, limit.low) == limit.low and limit.check(name, limit.high) == limit.high
        below = limit.low - (1 if limit.whole else limit.step)
        with pytest.raises(InvalidInputError, match=name):
            limit.check(name, below)
        with pytest.raises(InvalidInputError, match=name):
            limit.check(name, limit.high + (1 if limit.whole else limit.step))
        with pytest.raises(InvalidInputError, match="finite"):
            limit.check(name, math.inf if limit.low <= 0 <= limit.high else math.nan)
    assert (LIMITS["steps"].low, LIMITS["steps"].high) == (1, 200)
    assert (LIMITS["ip_scale"].low, LIMITS["ip_scale"].high) == (0.0, 1.0)
    assert LIMITS["seed"].high == 2**32 - 1
    assert LIMITS["steps"].check("steps", 3.0) == 3 and isinstance(LIMITS["steps"].check("steps", 3.0), int)
    with pytest.raises(InvalidInputError, match="whole number"):
        LIMITS["steps"].check("steps", 3.5)


@pytest.mark.parametrize("seed", [1.5, True, "7", math.nan, -1, 2**32, None])
def test_check_seed_refuses_what_is_not_a_whole_number_in_range(seed):
    with pytest.raises(InvalidInputError, match="seed"):
        check_seed(seed)


def test_check_seed_and_rounds_accept_whole_numbers():
    assert check_seed(0) == 0 and check_seed(7.0) == 7 and check_seed(2**32 - 1) == 2**32 - 1
    assert check_rounds(3) == 3
    with pytest.raises(InvalidInputError, match="rounds"):
        check_rounds(LIMITS["rounds"].high + 1)


def test_check_prompt_strips_refuses_blank_and_cuts_at_the_limit_with_a_warning():
    assert check_prompt("  a red fox \n") == CheckedPrompt("a red fox")
    for blank in (None, "", "   \n"):
        with pytest.raises(InvalidInputError, match="empty"):
            check_prompt(blank)
    with pytest.raises(InvalidInputError, match="text"):
        check_prompt(42)
    exact = "x" * MAX_PROMPT_CHARS
    assert check_prompt(exact) == CheckedPrompt(exact)
    long = check_prompt("fox " * 1000)
    assert len(long.prompt) <= MAX_PROMPT_CHARS and long.prompt == ("fox " * 1000)[:MAX_PROMPT_CHARS].rstrip()
    assert len(long.warnings) == 1 and "3999 characters" in long.warnings[0]
    assert f"the limit is {MAX_PROMPT_CHARS}" in long.warnings[0]
    assert check_prompt(long) is long  # a checked prompt is not checked again


def test_round_settings_check_every_limit_and_the_guidance_modes():
    RoundSettings().check()
    assert RoundSettings().guidance_mode == DEFAULT_GUIDANCE_MODE == "auto"
    assert GUIDANCE_MODES == ("auto", *MLLM_GUIDANCE_MODES) and MLLM_GUIDANCE_MODES == ("question", "dialogue")
    bad = [
        ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"guidance_scale": 31.0}, "guidance scale"),
        ({"ip_scale": -0.1}, "ip scale"), ({"aligner_passes": 11}, "aligner passes"),
        ({"max_critique_tokens": 4}, "max critique tokens"), ({"guidance_mode": "shout"}, "guidance mode"),
        ({"critique": "yes"}, "critique"), ({"guidance_mode": "dialogue", "critique": False}, "dialogue"),
    ]
    for values, named in bad:
        with pytest.raises(InvalidInputError, match=named):
            RoundSettings(**values).check()
    RoundSettings(guidance_mode="auto", critique=False).check()  # auto without text is question mode
    with pytest.raises(InvalidInputError, match="unknown round settings"):
        RoundSettings.from_values({"stepz": 3})
    assert RoundSettings.from_values({"steps": 4}).steps == 4


def test_round_settings_resolve_to_the_presets_defaults_unless_set():
    preset = get_preset("tiny-sdxl")
    resolved = RoundSettings().resolve(preset)
    assert (resolved.steps, resolved.guidance_scale, resolved.ip_scale, resolved.aligner_passes) == (
        preset.default_steps, preset.default_guidance_scale, preset.ip_scale, preset.aligner_passes)
    assert (resolved.width, resolved.height) == (preset.width, preset.height)
    assert resolved.max_critique_tokens == DEFAULT_MAX_CRITIQUE_TOKENS and resolved.guidance_mode == "auto"
    chosen = RoundSettings(steps=7, guidance_scale=2.5, ip_scale=0.4, aligner_passes=1).resolve(preset)
    assert (chosen.steps, chosen.guidance_scale, chosen.ip_scale, chosen.aligner_passes) == (7, 2.5, 0.4, 1)
    assert isinstance(chosen.steps, int) and isinstance(chosen.guidance_scale, float)
    assert chosen.to_dict()["steps"] == 7
    with pytest.raises(InvalidInputError, match="steps"):
        RoundSettings(steps=500).resolve(preset)


def test_round_arguments_round_trip_through_argparse():
    parser = argparse.ArgumentParser()
    add_round_arguments(parser)
    assert round_settings_from_args(parser.parse_args([])) == RoundSettings()
    args = parser.parse_args(["--steps", "9", "--guidance-scale", "4.5", "--ip-scale", "0.3", "--passes", "2",
                              "--guidance-mode", "question", "--max-critique-tokens", "64", "--no-critique"])
    assert round_settings_from_args(args) == RoundSettings(steps=9, guidance_scale=4.5, ip_scale=0.3, aligner_passes=2,
                                                           guidance_mode="question", max_critique_tokens=64,
                                                           critique=False)
    with pytest.raises(InvalidInputError, match="steps"):
        round_settings_from_args(parser.parse_args(["--steps", "0"]))
    with pytest.raises(SystemExit):  # argparse refuses a mode it does not know
        parser.parse_args(["--guidance-mode", "shout"])


def model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser


def test_model_arguments_round_trip_through_argparse(monkeypatch):
    for variable in MODEL_ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    assert model_options_from_args(model_parser().parse_args([])) == ModelOptions()
    args = model_parser().parse_args(["--preset", "tiny-flux", "--device", "cpu", "--quantization", "none",
                                      "--diffusion-quantization", "none", "--mllm", "tiny-qwen", "--aligner", "a/b",
                                      "--offload", "--questions", "release"])
    options = model_options_from_args(args)
    assert options == ModelOptions(preset="tiny-flux", device="cpu", quantization="none", diffusion_quantization="none",
                                   mllm="tiny-qwen", aligner="a/b", offload=True, questions="release")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.preset = "sdxl"


def test_model_options_default_to_the_environment_and_flags_win(monkeypatch):
    assert MODEL_ENVIRONMENT == {"preset": "IMG_PRESET", "mllm": "IMG_MLLM", "quantization": "IMG_QUANTIZATION"}
    monkeypatch.setenv("IMG_PRESET", "tiny-flux")
    monkeypatch.setenv("IMG_MLLM", "tiny-qwen")
    monkeypatch.setenv("IMG_QUANTIZATION", "bnb-nf4")
    options = model_options_from_args(model_parser().parse_args([]))
    assert (options.preset, options.mllm, options.quantization) == ("tiny-flux", "tiny-qwen", "bnb-nf4")
    flags = model_options_from_args(model_parser().parse_args(["--preset", "tiny-sdxl", "--quantization", "none"]))
    assert (flags.preset, flags.mllm, flags.quantization) == ("tiny-sdxl", "tiny-qwen", "none")
    monkeypatch.setenv("IMG_PRESET", "")  # empty means unset
    assert model_options_from_args(model_parser().parse_args([])).preset is None


def test_a_huge_value_is_not_echoed_whole():
    with pytest.raises(InvalidInputError) as raised:
        check_seed(10**300)
    message = str(raised.value)
    assert message.startswith("seed must be from 0 to ") and len(message) < 120 and message.endswith("…")
    for huge in (10**400, -(10**400)):  # float() of these overflows
        with pytest.raises(InvalidInputError, match=r"^seed must be from 0 to 4294967295, got -?1000"):
            check_seed(huge)
    assert check_seed(7.0) == 7 and LIMITS["steps"].check("steps", 200) == 200
