"""convert_llava on a tiny checkpoint written in the ORIGINAL LLaVA code-base layout.

The fixture writes what the original code-base saves: config.json with `LlavaLlamaForCausalLM` and the mm_*
settings, Llama weights under `model.*` / `lm_head`, an mlp2x_gelu projector under `model.mm_projector.{0,2}`
in two .bin shards with their index, and a Llama tokenizer; plus a separate tiny CLIP vision tower folder.
A second checkpoint sets `unfreeze_mm_vision_tower` and carries a tuned tower (transformers 4.x key names,
`model.vision_tower.vision_tower.vision_model.*`), which the conversion must keep.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from img_core.cli.convert_llava import main  # noqa: E402
from img_core.errors import InvalidInputError  # noqa: E402
from img_core.mllm import CONVERSION_RECORD, MLLMCritic, resolve_spec  # noqa: E402
from img_core.mllm.converted import COMPLETION_MARKER, is_prepared  # noqa: E402
from img_core.tiny.mllm import (  # noqa: E402
    build_tiny_llama_tokenizer,
    tiny_clip_image_processor,
    tiny_clip_vision_config,
    tiny_llama_config,
)
from img_core.weights.convert_llava import convert_llava_checkpoint  # noqa: E402

VISION_WIDTH = 32  # tiny CLIP hidden size (mm_hidden_size)


def mlp2x_gelu(features: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The original LLaVA-1.5 projector applied by hand: Linear -> GELU -> Linear."""
    hidden = F.linear(features, weights["model.mm_projector.0.weight"], weights["model.mm_projector.0.bias"])
    return F.linear(F.gelu(hidden), weights["model.mm_projector.2.weight"], weights["model.mm_projector.2.bias"])


def original_tower_state(tower) -> dict[str, torch.Tensor]:
    """A CLIPVisionModel's weights under the original LLaVA checkpoint's names (transformers 4.x CLIP keys)."""
    return {
        "model.vision_tower.vision_tower.vision_model." + key.removeprefix("vision_model."): value.clone()
        for key, value in tower.state_dict().items()
    }


def write_original_layout(
    source, llama_dir, seed: int = 0, tuned_tower=None, shards: int = 2
) -> dict[str, torch.Tensor]:
    """Write a tiny original-layout LLaVA checkpoint into `source`; save the same Llama weights as a plain
    LlamaForCausalLM into `llama_dir`. With `tuned_tower` (a CLIPVisionModel) the config sets
    `unfreeze_mm_vision_tower` and the checkpoint carries that tower's weights. Returns the projector tensors."""
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_llama_tokenizer()
    tokenizer.save_pretrained(source)
    config = tiny_llama_config(len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llama = LlamaForCausalLM(config)
        hidden = config.hidden_size
        projector = {
            "model.mm_projector.0.weight": torch.randn(hidden, VISION_WIDTH) * 0.1,
            "model.mm_projector.0.bias": torch.randn(hidden) * 0.1,
            "model.mm_projector.2.weight": torch.randn(hidden, hidden) * 0.1,
            "model.mm_projector.2.bias": torch.randn(hidden) * 0.1,
        }
    llama.save_pretrained(llama_dir)

    state = {key: value.clone() for key, value in llama.state_dict().items()}
    state.update(projector)
    if tuned_tower is None:
        # Some original checkpoints carry a frozen tower too; the original loader ignores it, so must we.
        state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.full((VISION_WIDTH,), 7.0)
    else:
        state.update(original_tower_state(tuned_tower))
    keys = sorted(state)
    names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
    for filename in names:
        torch.save({key: state[key] for key in keys if weight_map[key] == filename}, source / filename)
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    original_config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_parameters["rope_theta"],
        "hidden_act": "silu",
        "vocab_size": len(tokenizer),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": VISION_WIDTH,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
    }
    if tuned_tower is not None:
        original_config["unfreeze_mm_vision_tower"] = True
    (source / "config.json").write_text(json.dumps(original_config, indent=2))
    return projector


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import CLIPVisionModel

    root = tmp_path_factory.mktemp("convert-llava")
    source, llama_dir, out = root / "llava", root / "llama", root / "hf"
    tower_dir = root / "clip-vit-large-patch14-336"
    source.mkdir()
    projector = write_original_layout(source, llama_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(tower_dir)
    tiny_clip_image_processor().save_pretrained(tower_dir)

    exit_code = main(["--source", str(source), "--out", str(out), "--vision-tower", str(tower_dir)])
    assert exit_code == 0
    return {"out": out, "llama_dir": llama_dir, "tower_dir": tower_dir, "projector": projector, "source": source}


@pytest.fixture(scope="module")
def critic(converted):
    return MLLMCritic.load(resolve_spec(str(converted["out"])))


def test_language_model_logits_equal_plain_llama(converted, critic):
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(converted["llama_dir"]).eval()
    input_ids = critic.tokenizer("A photo of a red fox playing a trumpet.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = llama(input_ids=input_ids).logits  # (1, S, V)
        actual = critic.model(input_ids=input_ids).logits  # (1, S, V + 2)
    vocab = expected.shape[-1]
    assert actual.shape[-1] == vocab + 2  # <image> and <pad> added
    torch.testing.assert_close(actual[..., :vocab], expected, atol=1e-5, rtol=0)


def test_added_tokens_and_record(converted, critic):
    vocab = len(build_tiny_llama_tokenizer())
    assert critic.tokenizer.convert_tokens_to_ids("<image>") == vocab
    assert critic.tokenizer.convert_tokens_to_ids("<pad>") == vocab + 1
    assert critic.model.config.image_token_id == vocab
    record = json.loads((converted["out"] / CONVERSION_RECORD).read_text())
    assert record["chat_template"] == "llava-v0" and record["image_aspect"] == "pad"
    assert critic.spec.chat_template == "llava-v0"
    assert critic.spec.hidden_size == 64


def test_projector_is_mlp2x_gelu(converted, critic):
    weights = converted["projector"]
    features = torch.randn(1, 5, VISION_WIDTH)
    expected = mlp2x_gelu(features, weights)
    with torch.no_grad():
        actual = critic.model.model.multi_modal_projector(features)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_image_features_use_the_given_tower_layer_minus_2_without_cls(converted, critic):
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(converted["tower_dir"]).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    weights = converted["projector"]
    with torch.no_grad():
        patches = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, 16, 32)
        expected = mlp2x_gelu(patches, weights)
        actual = critic.model.get_image_features(pixel_values).pooler_output[0]  # (16, 64)
    torch.testing.assert_close(actual, expected[0], atol=1e-5, rtol=0)
    # The checkpoint's own (bogus, all-7) tower weights were dropped in favour of the given tower.
    converted_norm = critic.model.model.vision_tower.post_layernorm.weight
    assert torch.equal(converted_norm, tower.post_layernorm.weight) and not torch.all(converted_norm == 7.0)


def test_frozen_tower_weights_are_dropped_with_a_note(tmp_path, converted, caplog):
    out = tmp_path / "again"
    with caplog.at_level("WARNING", logger="img_core.weights.convert_llava"):
        convert_llava_checkpoint(converted["source"], out, vision_tower=converted["tower_dir"])
    assert "dropped 1 vision tower tensors" in caplog.text and "unfreeze_mm_vision_tower" in caplog.text
    record = json.loads((out / CONVERSION_RECORD).read_text())
    assert record["vision_tower_weights"] == str(converted["tower_dir"])


def test_conversion_output_is_marked_complete_and_nothing_half_is_left(converted):
    assert is_prepared(converted["out"]) and (converted["out"] / COMPLETION_MARKER).is_file()
    # only the lock the command held (shared with `prepare`): no partial or previous folder
    assert sorted(p.name for p in converted["out"].parent.iterdir() if p.name.startswith(".")) == [".hf.lock"]


def test_tuned_vision_tower_is_kept_when_the_config_unfreezes_it(tmp_path, converted):
    """unfreeze_mm_vision_tower: the checkpoint's tuned tower replaces the CLIP one (original LLaVA loader)."""
    from transformers import CLIPVisionModel

    from img_core.tiny.mllm import tiny_clip_vision_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        tuned = CLIPVisionModel(tiny_clip_vision_config()).eval()
    source, out = tmp_path / "llava", tmp_path / "hf"
    source.mkdir()
    projector = write_original_layout(source, tmp_path / "llama", tuned_tower=tuned, shards=3)
    assert main(["--source", str(source), "--out", str(out), "--vision-tower", str(converted["tower_dir"])]) == 0
    critic = MLLMCritic.load(resolve_spec(str(out)))

    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        patches = tuned(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, 16, 32)
        expected = mlp2x_gelu(patches, projector)
        actual = critic.model.get_image_features(pixel_values).pooler_output[0]  # (16, 64)
        base = CLIPVisionModel.from_pretrained(converted["tower_dir"]).eval()
        base_patches = base(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(actual, expected[0], atol=1e-5, rtol=0)
    assert (mlp2x_gelu(base_patches, projector)[0] - actual).abs().max() > 1e-2  # not the base tower's
    record = json.loads((out / CONVERSION_RECORD).read_text())
    assert record["vision_tower_weights"] == "checkpoint (unfreeze_mm_vision_tower)"


def test_converted_model_gives_guidance(critic):
    from PIL import Image

    image = Image.new("RGB", (64, 40), (90, 90, 200))
    question = critic.guidance(image, "a blue square")
    dialogue = critic.guidance(image, "a blue square", critique="make it red", mode="dialogue")
    assert question.shape[0] == 1 and question.shape[2] == 64
    assert dialogue.shape[1] > question.shape[1]


def test_unsupported_projector_is_rejected(tmp_path):
    config = {"architectures": ["LlavaLlamaForCausalLM"], "mm_projector_type": "linear"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="mlp2x_gelu"):
        convert_llava_checkpoint(tmp_path, tmp_path / "out")


def test_main_reports_a_missing_source(tmp_path, capsys):
    assert main(["--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_non_finite_weights_are_refused_and_nothing_is_left(tmp_path, converted):
    source = tmp_path / "llava"
    shutil.copytree(converted["source"], source)
    shard = source / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    key = next(k for k in state if k.startswith("model.layers."))
    state[key][0, 0] = float("nan")
    torch.save(state, shard)
    out = tmp_path / "hf"
    with pytest.raises(InvalidInputError, match=f"{key.removeprefix('model.')} holds NaN"):
        convert_llava_checkpoint(source, out, vision_tower=converted["tower_dir"])
    assert not out.exists() and not is_prepared(out)


def test_model_type_llava_converts_with_the_llama_tokenizer_and_release_token_ids(tmp_path, converted):
    """Older original configs say `model_type: "llava"`; AutoTokenizer then builds another tokenizer class.
    The conversion names LlamaTokenizer: the saved tokenizer is a Llama one with the release's token ids."""
    from transformers import LlamaTokenizer

    source, out = tmp_path / "llava", tmp_path / "hf"
    source.mkdir()
    write_original_layout(source, tmp_path / "llama")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    assert main(["--source", str(source), "--out", str(out), "--vision-tower", str(converted["tower_dir"])]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"

    release = LlamaTokenizer.from_pretrained(source)  # what the original code-base tokenizes with
    saved = LlamaTokenizer.from_pretrained(out)
    text = "###Human: What is in the picture? A red fox playing a trumpet.\n###Assistant:"
    assert saved(text).input_ids == release(text).input_ids
    assert saved.convert_tokens_to_ids("<image>") == len(release)
    critic = MLLMCritic.load(resolve_spec(str(out)))
    guidance = critic.guidance(Image.new("RGB", (40, 40)), "a blue square")
    assert guidance.shape[-1] == 64 and torch.isfinite(guidance).all()


def test_a_conversion_whose_smoke_forward_fails_is_not_marked_complete(tmp_path, converted):
    """A vision tower folder whose image processor makes 36 patches for a tower (and image_seq_length) of
    16: every guidance call would fail. The conversion raises and leaves no complete folder."""
    from transformers import CLIPVisionModel

    tower = tmp_path / "mismatched-tower"
    CLIPVisionModel.from_pretrained(converted["tower_dir"]).save_pretrained(tower)
    processor = tiny_clip_image_processor()
    processor.size, processor.crop_size = {"shortest_edge": 48}, {"height": 48, "width": 48}
    processor.save_pretrained(tower)
    out = tmp_path / "hf"
    with pytest.raises(InvalidInputError, match="smoke forward"):
        convert_llava_checkpoint(converted["source"], out, vision_tower=tower)
    assert not out.exists() and not is_prepared(out)
    partial = out.with_name(f".{out.name}.partial")
    assert not (partial / COMPLETION_MARKER).exists()
    # the same source with a fitting tower converts (resuming the shards already done)
    convert_llava_checkpoint(converted["source"], out, vision_tower=converted["tower_dir"])
    assert is_prepared(out)
