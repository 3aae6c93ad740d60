"""Precision follows memory: which MLLM quantization each preset gets on which GPU
(img_core.mllm.quantization.choose_quantization, from the README memory table's estimates)."""

import pytest

from img_core.mllm.quantization import (
    MLLM_GIB,
    PRECISION_ORDER,
    choose_quantization,
    mllm_precision,
    preset_other_gib,
)
from img_core.presets import PRESETS
from img_core.session import IMGSession

# torch.cuda's total_memory of real cards, GiB (what `measured_gpu_gib` reads on them).
GPUS_GIB = {"A10G 24 GB": 22.1, "L4 24 GB": 22.0, "A100 40 GB": 39.4, "L40S 48 GB": 44.4,
            "ZeroGPU 48 GB slice": 44.7, "A100 80 GB": 79.2, "H100 80 GB": 79.1}

# The README's "which GPU gets which" table: preset -> GPU -> quantization.
EXPECTED = {
    "sdxl": {"A10G 24 GB": "bnb-nf4", "L4 24 GB": "bnb-nf4", "A100 40 GB": "none", "L40S 48 GB": "none",
             "ZeroGPU 48 GB slice": "none", "A100 80 GB": "none", "H100 80 GB": "none"},
    "flux-dev": {"A10G 24 GB": "bnb-nf4", "L4 24 GB": "bnb-nf4", "A100 40 GB": "bnb-8bit", "L40S 48 GB": "none",
                 "ZeroGPU 48 GB slice": "none", "A100 80 GB": "none", "H100 80 GB": "none"},
}
EXPECTED["sdxl-dpo"] = EXPECTED["sdxl"]


@pytest.mark.parametrize("preset_name", sorted(EXPECTED))
@pytest.mark.parametrize("gpu", sorted(GPUS_GIB))
def test_each_preset_gets_the_most_precise_mllm_that_fits_each_gpu(preset_name, gpu):
    preset = PRESETS[preset_name]
    other = preset_other_gib(preset.mllm, preset.resident_gib)
    choice = choose_quantization(preset.mllm, "cuda", total_gib=GPUS_GIB[gpu], other_gib=other)
    assert choice.quantization == EXPECTED[preset_name][gpu], choice.reason
    # it fits, and the next more precise one would not (or it is already the most precise)
    room = GPUS_GIB[gpu] - other - 1.0
    rank = PRECISION_ORDER.index(choice.quantization)
    if choice.quantization != "bnb-nf4" or MLLM_GIB[preset.mllm]["bnb-nf4"] <= room:
        assert MLLM_GIB[preset.mllm][choice.quantization] <= room
    if rank > 0:
        assert MLLM_GIB[preset.mllm][PRECISION_ORDER[rank - 1]] > room
    assert f"{GPUS_GIB[gpu]:.1f} GiB" in choice.reason


def test_preset_estimates_split_into_the_mllm_and_the_rest():
    # sdxl's 21.1 GiB resident = 8.9 GiB LLaVA-13B in nf4 (with its activations) + 12.2 GiB for the rest
    assert preset_other_gib("img-llava-13b", PRESETS["sdxl"].resident_gib) == pytest.approx(12.2)
    assert preset_other_gib("img-llava-13b", PRESETS["flux-dev"].resident_gib) == pytest.approx(16.4)
    assert preset_other_gib("tiny-llava", 0.0) == 0.0


def test_measured_free_memory_counts_when_smaller_than_the_total():
    # an 80 GB card with 30 GiB already taken by another process: 8-bit, not bf16, beside sdxl
    other = preset_other_gib("img-llava-13b", PRESETS["sdxl"].resident_gib)
    assert choose_quantization("img-llava-13b", "cuda", 79.2, free_gib=49.2, other_gib=other).quantization == "none"
    assert choose_quantization("img-llava-13b", "cuda", 79.2, free_gib=30.0, other_gib=other).quantization == "bnb-8bit"
    assert choose_quantization("img-llava-13b", "cuda", 79.2, free_gib=20.0, other_gib=other).quantization == "bnb-nf4"


def test_cpu_unknown_models_and_unknown_gpus():
    assert choose_quantization("img-llava-13b", "cpu", 1000.0).quantization == "none"
    unknown_model = choose_quantization("/some/converted/folder", "cuda", 79.2)
    assert unknown_model.quantization == "bnb-nf4" and "no size estimate" in unknown_model.reason
    unknown_gpu = choose_quantization("img-llava-13b", "cuda", None)
    assert unknown_gpu.quantization == "bnb-nf4" and "unknown" in unknown_gpu.reason
    # a GPU too small even for nf4 still gets the smallest, and says so
    tiny_gpu = choose_quantization("img-llava-13b", "cuda", 16.0, other_gib=12.2)
    assert tiny_gpu.quantization == "bnb-nf4" and "the smallest" in tiny_gpu.reason


def test_quantization_flag_overrides_the_choice():
    forced = mllm_precision("img-llava-13b", "cpu", PRESETS["sdxl"], requested="bnb-8bit")
    assert forced.quantization == "bnb-8bit" and "--quantization" in forced.reason
    assert mllm_precision("img-llava-13b", "cpu", PRESETS["sdxl"]).quantization == "none"


def test_a_loaded_session_records_and_reports_its_precision(tiny_root):
    session = IMGSession.from_preset("tiny-sdxl", device="cpu", tiny_root=tiny_root)
    events = []
    session.load(on_stage=events.append)
    messages = [event.message for event in events if event.message]
    assert session.mllm_precision.quantization == "none"
    assert any("MLLM" in line and "unquantized" in line for line in messages), messages
