"""MLLMCritic on tiny random-weight LLaVA and Qwen2.5-VL models, loaded like the real ones."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from img_core.errors import InvalidInputError, WeightsNotFoundError  # noqa: E402
from img_core.mllm import (  # noqa: E402
    KNOWN_MLLMS,
    QUANTIZATIONS,
    MLLMCritic,
    MLLMSpec,
    default_quantization,
    expand_to_square,
    resolve_spec,
)
from img_core.questions import pick_question  # noqa: E402
from img_core.tiny.mllm import TINY_CONTEXT_TOKENS, build_tiny_llava, build_tiny_qwen  # noqa: E402

TINY_NAMES = ["tiny-llava", "tiny-qwen"]
PROMPT = "a red fox playing a trumpet under a rainbow"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-mllms")
    build_tiny_llava(root / "tiny-llava", seed=0)
    build_tiny_qwen(root / "tiny-qwen", seed=0)
    return root


@pytest.fixture(scope="module")
def critics(tiny_root):
    return {name: MLLMCritic.load(resolve_spec(name, tiny_root)) for name in TINY_NAMES}


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (64, 48), (200, 40, 30))


# ----------------------------------------------------------------------------------------- specs


def test_known_specs_and_resolution(tiny_root):
    assert KNOWN_MLLMS["img-llava-13b"].chat_template == "llava-v0"
    assert KNOWN_MLLMS["img-llava-13b"].hidden_size == 5120
    assert KNOWN_MLLMS["llava-1.5-13b"].model_id == "llava-hf/llava-1.5-13b-hf"
    assert KNOWN_MLLMS["llava-1.5-13b"].chat_template == "llava-v1"
    assert KNOWN_MLLMS["qwen2.5-vl-7b"].hidden_size == 3584
    assert resolve_spec("tiny-qwen", tiny_root).model_id == str(tiny_root / "tiny-qwen")
    assert not resolve_spec("img-llava-13b").model_id.startswith("~")
    assert default_quantization("cpu") == "none"
    assert default_quantization("cuda") == "bnb-nf4"
    with pytest.raises(InvalidInputError, match="does not fit family"):
        MLLMSpec("x", "x", family="llava", chat_template="qwen2.5-vl", hidden_size=8)
    with pytest.raises(InvalidInputError, match="tiny models root"):
        resolve_spec("tiny-llava")


def test_tiny_models_are_small_and_seeded(tiny_root, tmp_path):
    for name in TINY_NAMES:
        size = sum(path.stat().st_size for path in (tiny_root / name).iterdir())
        assert size < 20 * 2**20, f"{name} takes {size} bytes"
    same = build_tiny_llava(tmp_path / "same", seed=0)
    other = build_tiny_llava(tmp_path / "other", seed=1)
    reference = (tiny_root / "tiny-llava" / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == reference
    assert (other / "model.safetensors").read_bytes() != reference


def test_expand_to_square_pads_with_fill():
    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    square = expand_to_square(wide, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (1, 2, 3)  # padding above
    assert square.getpixel((20, 20)) == (255, 255, 255)  # the image, centred
    assert square.getpixel((39, 39)) == (1, 2, 3)  # padding below


# -------------------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("name", TINY_NAMES)
def test_guidance_shape_dtype_and_determinism(critics, image, name):
    critic = critics[name]
    guidance = critic.guidance(image, PROMPT)
    assert critic.hidden_size == 64
    assert guidance.dim() == 3 and guidance.shape[0] == 1 and guidance.shape[2] == 64
    question_tokens = len(critic.tokenizer.encode(critic.question_for(PROMPT, 0), add_special_tokens=False))
    assert guidance.shape[1] > question_tokens  # system text + image tokens + question
    assert guidance.dtype == torch.float32 and guidance.device.type == "cpu"
    assert torch.isfinite(guidance).all()
    assert torch.equal(guidance, critic.guidance(image, PROMPT))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_dialogue_appends_the_critique_to_the_question(critics, image, name):
    critic = critics[name]
    question = critic.guidance(image, PROMPT, critique="ignored in question mode", mode="question")
    assert torch.equal(question, critic.guidance(image, PROMPT))
    dialogue = critic.guidance(image, PROMPT, critique="make the fox red and add a rainbow", mode="dialogue")
    assert dialogue.shape[1] > question.shape[1] + 10
    # Causal attention: the conversation up to the answer is unchanged, the answer tokens are new.
    torch.testing.assert_close(dialogue[:, : question.shape[1]], question, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_edited_critique_changes_guidance(critics, image, name):
    critic = critics[name]
    first = critic.guidance(image, PROMPT, critique="the fox should be red", mode="dialogue")
    edited = critic.guidance(image, PROMPT, critique="the fox should be big", mode="dialogue")
    assert first.shape == edited.shape  # same length edit, one word differs
    assert (first - edited).abs().max() > 1e-3
    differing_positions = (first - edited).abs().amax(dim=-1)[0] > 1e-6
    first_difference = int(differing_positions.nonzero()[0])
    assert first_difference > first.shape[1] - 10  # only from the edited word on


def test_dialogue_needs_a_critique(critics, image):
    with pytest.raises(ValueError, match="critique"):
        critics["tiny-llava"].guidance(image, PROMPT, mode="dialogue")
    with pytest.raises(ValueError, match="guidance mode"):
        critics["tiny-llava"].guidance(image, PROMPT, mode="pooled")


def test_seed_picks_the_question(critics, image):
    critic = critics["tiny-llava"]
    assert critic.question_for(PROMPT, 3) == pick_question(PROMPT, 3)
    seed_a, seed_b = 0, next(s for s in range(1, 50) if pick_question(PROMPT, s) != pick_question(PROMPT, 0))
    guidance_a = critic.guidance(image, PROMPT, seed=seed_a)
    guidance_b = critic.guidance(image, PROMPT, seed=seed_b)
    assert guidance_a.shape != guidance_b.shape or not torch.allclose(guidance_a, guidance_b)


@pytest.mark.parametrize("size", [(64, 64), (17, 9), (300, 120)])
def test_any_image_size(critics, size):
    image = Image.new("RGB", size, (10, 200, 90))
    llava = critics["tiny-llava"].guidance(image, PROMPT)
    square = critics["tiny-llava"].guidance(Image.new("RGB", (64, 64)), PROMPT)
    assert llava.shape == square.shape  # padded to square, then resized: always 16 image tokens
    assert critics["tiny-qwen"].guidance(image, PROMPT).shape[2] == 64


# -------------------------------------------------------------------------------------- critique


@pytest.mark.parametrize("name", TINY_NAMES)
def test_critique_is_bounded_greedy_text(critics, image, name):
    critic = critics[name]
    short = critic.critique(image, PROMPT, max_new_tokens=6)
    longer = critic.critique(image, PROMPT, max_new_tokens=20)
    assert isinstance(short, str) and len(short) > 0
    # Every tiny-model token decodes to at most one printable character.
    assert len(short) <= 6 and len(longer) <= 20
    assert all(char.isprintable() for char in longer)
    assert longer.startswith(short)  # greedy: the first tokens are the same
    assert critic.critique(image, PROMPT, max_new_tokens=6) == short


# ------------------------------------------------------------------------------------ long prompts


@pytest.mark.parametrize("name", TINY_NAMES)
def test_long_prompt_is_truncated_with_a_warning(critics, image, name, caplog):
    critic = critics[name]
    long_prompt = "a fox with a trumpet " * 120  # 2520 characters, > 1024 tokens in both tiny tokenizers
    with caplog.at_level(logging.WARNING, logger="img_core.mllm"):
        guidance = critic.guidance(image, long_prompt)
    assert guidance.shape[1] <= TINY_CONTEXT_TOKENS
    assert guidance.shape[1] >= TINY_CONTEXT_TOKENS - 8  # cut to fit, not emptied
    messages = [record.getMessage() for record in caplog.records if "too long" in record.getMessage()]
    assert len(messages) == 1
    cut = int(re.search(r"cut (\d+) tokens", messages[0]).group(1))
    assert cut >= len(long_prompt) - TINY_CONTEXT_TOKENS  # at least the overflow
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="img_core.mllm"):
        text = critic.critique(image, long_prompt, max_new_tokens=8)
    assert 0 < len(text) <= 8
    assert any("too long" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------ missing weights


def test_missing_local_folder_names_it(tmp_path):
    spec = dataclasses.replace(KNOWN_MLLMS["img-llava-13b"], model_id=str(tmp_path / "no-such-folder"))
    with pytest.raises(WeightsNotFoundError, match="no-such-folder") as raised:
        MLLMCritic.load(spec)
    assert "convert-llava" in str(raised.value)
    assert "shi-labs/IMG" in str(raised.value)


def test_missing_hub_weights_offline():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 set before huggingface_hub is imported")
    spec = KNOWN_MLLMS["llava-1.5-13b"]
    with pytest.raises(WeightsNotFoundError, match="llava-hf/llava-1.5-13b-hf") as raised:
        MLLMCritic.load(spec)
    assert "hf download llava-hf/llava-1.5-13b-hf" in str(raised.value)


# -------------------------------------------------------------------------------------- quantization

MIN_COSINE = {"bnb-nf4": 0.95, "quanto-int4": 0.95, "bnb-8bit": 0.999, "quanto-int8": 0.999}


@pytest.mark.parametrize("quantization", QUANTIZATIONS[1:])
@pytest.mark.parametrize("name", TINY_NAMES)
def test_quantized_loading(critics, tiny_root, image, name, quantization):
    full = critics[name]
    quantized = MLLMCritic.load(resolve_spec(name, tiny_root), quantization=quantization)
    assert quantized.quantization == quantization
    assert quantized.memory_bytes() < full.memory_bytes()

    module_kinds = {type(module).__module__.split(".")[0] for module in quantized.model.modules()}
    assert module_kinds & {"bitsandbytes", "optimum"}, f"no quantized layer in {quantization}"
    vision = quantized.model.model.vision_tower if name == "tiny-llava" else quantized.model.model.visual
    assert all(type(m) is torch.nn.Linear for m in vision.modules() if isinstance(m, torch.nn.Linear))

    reference = full.guidance(image, PROMPT)
    guidance = quantized.guidance(image, PROMPT)
    assert guidance.shape == reference.shape and guidance.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(guidance.flatten(), reference.flatten(), dim=0)
    assert cosine > MIN_COSINE[quantization]
