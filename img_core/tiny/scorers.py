"""Tiny random-weight stand-ins for the scorers with weights of their own (HPS v2.1 and v2.0, PickScore, both
CLIPScores, ImageReward), for CPU tests.

Built from configs with transformers' `CLIPModel` / `CLIPProcessor`, saved in the layouts of the hub repos
they stand in for, and loaded by img_core.evaluation.scorers through the very same loaders as the real ids:
    <tiny_root>/scorers-v3/tiny-clip-h/       like laion/CLIP-ViT-H-14-laion2B-s32B-b79K (config, processor, weights)
    <tiny_root>/scorers-v3/tiny-pickscore/    like yuvalkirstain/PickScore_v1 (CLIPModel weights)
    <tiny_root>/scorers-v3/tiny-hpsv2/HPS_v2.1_compressed.pt   like xswu/HPSv2 (open_clip keys, {"state_dict": ...})
    <tiny_root>/scorers-v3/tiny-hpsv2/HPS_v2_compressed.pt     HPS v2.0, the same layout, other weights
    <tiny_root>/scorers-v3/tiny-clip-l/       like openai/clip-vit-large-patch14
    <tiny_root>/scorers-v3/tiny-clip-b/       like openai/clip-vit-base-patch32 (Hessel et al.'s CLIP-S)
    <tiny_root>/scorers-v3/tiny-imagereward/  like THUDM/ImageReward (`ImageReward.pt` in the release's keys, `med_config.json`)
    <tiny_root>/scorers-v3/tiny-bert/         like bert-base-uncased (a WordPiece tokenizer over characters)

The ImageReward file is a seeded ImageRewardModel written back in the release's keys
(`imagereward_to_release`, the inverse of `convert_imagereward_checkpoint`). The HPS file is a CLIPModel's weights written back in open_clip's layout (`transformers_to_open_clip`,
the inverse of `img_core.evaluation.scorers.open_clip_to_transformers`), so loading it exercises the real conversion.
Weights are seeded: the same seed gives the same files. The folder is built privately and renamed into
place, so parallel test workers never see half-written weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from img_core.evaluation.imagereward import (
    HEAD_INDICES,
    RELEASE_BLOCK_RENAMES,
    RELEASE_VISION_KEYS,
    ImageRewardModel,
    ImageRewardSpec,
    text_config_from_med,
    vision_config,
)
from img_core.tiny.diffusion import build_clip_tokenizer

TINY_SCORERS_VERSION = "scorers-v3"  # bump when the tiny scorer architectures change
TINY_SCORER_IMAGE_SIZE = 32
TINY_SCORER_FOLDERS = {"clip_h": "tiny-clip-h", "pickscore": "tiny-pickscore", "hpsv2": "tiny-hpsv2",
                       "clip_l": "tiny-clip-l", "clip_b": "tiny-clip-b", "imagereward": "tiny-imagereward",
                       "bert": "tiny-bert"}
TINY_IMAGEREWARD_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "patch_size": 8}  # BLIP's ViT-L/16 at 224 px, shrunk
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def ensure_tiny_scorers(tiny_root: str | Path, seed: int = 0) -> Path:
    """Build the tiny scorers under `tiny_root` (the folder of ensure_tiny_models) if missing; return their folder."""
    target = Path(tiny_root) / TINY_SCORERS_VERSION
    if (target / "COMPLETE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-scorers-", dir=target.parent))
    try:
        build_tiny_scorers(building, seed)
        (building / "COMPLETE").write_text(f"seed={seed}\n")
        try:
            os.rename(building, target)
        except OSError:
            if not (target / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def tiny_scorer_overrides(name: str, scorers_root: Path) -> dict[str, object]:
    """The fields of scorer `name`'s spec that point at hub ids, pointed at the tiny folders under
    `scorers_root` instead (apply them with `dataclasses.replace`)."""
    clip_h, clip_l = str(scorers_root / TINY_SCORER_FOLDERS["clip_h"]), str(scorers_root / TINY_SCORER_FOLDERS["clip_l"])
    clip_b = str(scorers_root / TINY_SCORER_FOLDERS["clip_b"])
    tiny = {
        "hpsv2": dict(model_id=clip_h, processor_id=clip_h,
                      open_clip_checkpoint=(str(scorers_root / TINY_SCORER_FOLDERS["hpsv2"]), "HPS_v2.1_compressed.pt")),
        "pickscore": dict(model_id=str(scorers_root / TINY_SCORER_FOLDERS["pickscore"]), processor_id=clip_h),
        "hpsv2.0": dict(model_id=clip_h, processor_id=clip_h,
                        open_clip_checkpoint=(str(scorers_root / TINY_SCORER_FOLDERS["hpsv2"]), "HPS_v2_compressed.pt")),
        "clipscore": dict(model_id=clip_l, processor_id=clip_l),
        "clipscore-hessel": dict(model_id=clip_b, processor_id=clip_b),
    }
    return tiny[name]


def tiny_imagereward_overrides(scorers_root: Path) -> dict[str, object]:
    """The fields of img_core.evaluation.imagereward.ImageRewardSpec pointed at the tiny folders."""
    return dict(repo=str(scorers_root / TINY_SCORER_FOLDERS["imagereward"]),
                tokenizer_id=str(scorers_root / TINY_SCORER_FOLDERS["bert"]), vision=dict(TINY_IMAGEREWARD_VISION),
                image_size=TINY_SCORER_IMAGE_SIZE)


def tiny_bert_tokenizer():
    """An uncased WordPiece tokenizer over single characters (every lower-case word spells out), standing in
    for bert-base-uncased, without BLIP's added [DEC]/[ENC] (the scorer adds them, as BLIP does)."""
    from transformers import BertTokenizer

    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = [*BERT_SPECIAL_TOKENS, *characters, *".,;:!?'\"-()", *(f"##{c}" for c in characters)]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n")
        return BertTokenizer(str(vocab_file), do_lower_case=True)


def tiny_med_config(vocab_size: int) -> dict:
    """A `med_config.json` like the release's (BERT with cross-attention), 32 wide and 2 layers deep."""
    return {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 40,
            "layer_norm_eps": 1e-12, "vocab_size": vocab_size, "type_vocab_size": 2, "pad_token_id": 0,
            "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "initializer_range": 0.02,
            "add_cross_attention": True, "encoder_width": TINY_IMAGEREWARD_VISION["hidden_size"]}


def imagereward_to_release(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ImageRewardModel state dict in the release's `ImageReward.pt` keys."""
    vision_renames = {ours: release for release, ours in RELEASE_BLOCK_RENAMES.items()}
    fixed = {ours: release for release, ours in RELEASE_VISION_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key.startswith("head."):
            _, position, kind = key.split(".")
            out[f"mlp.layers.{HEAD_INDICES[int(position)]}.{kind}"] = value
        elif key.startswith("vision_model.encoder.layers."):
            index, rest = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
            name, kind = rest.rsplit(".", 1)
            out[f"blip.visual_encoder.blocks.{index}.{vision_renames[name]}.{kind}"] = value
        elif key.startswith("text_encoder."):
            out["blip." + key] = value
        else:
            raise KeyError(f"imagereward_to_release does not know {key}")
    return {key: value.clone() for key, value in out.items()}


def tiny_imagereward_model(vocab_size: int, seed: int) -> ImageRewardModel:
    """A seeded random ImageRewardModel of the tiny sizes. Every linear layer is drawn with std 1/sqrt(fan-in)
    and the biases with std 0.1, so that the rewards of different images and prompts differ visibly (BERT's
    std 0.02 and the release's near-zero head make them all alike); the patch embedding likewise, the class
    and position embeddings with BLIP's std 0.02 (transformers' BLIP vision config initialises them at 1e-10)."""
    spec = ImageRewardSpec(vision=dict(TINY_IMAGEREWARD_VISION), image_size=TINY_SCORER_IMAGE_SIZE)  # release mean/std
    vision = vision_config(spec)
    torch.manual_seed(seed)
    model = ImageRewardModel(vision, text_config_from_med(tiny_med_config(vocab_size), vision.hidden_size),
                             spec.mean, spec.std).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(std=layer.in_features**-0.5)
                layer.bias.normal_(std=0.1)
        embeddings = model.vision_model.embeddings
        embeddings.patch_embedding.weight.normal_(std=embeddings.patch_embedding.weight[0].numel() ** -0.5)
        embeddings.class_embedding.normal_(std=0.02)
        embeddings.position_embedding.normal_(std=0.02)
    return model


def tiny_clip_config(hidden_act: str):
    """A CLIP with 32-wide towers, 32 px images and 16-d embeddings (ViT-H uses gelu, OpenAI's ViT-L quick_gelu)."""
    from transformers import CLIPConfig


    tokenizer = build_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TINY_SCORER_IMAGE_SIZE, patch_size=8, hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tiny_clip_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor


    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_SCORER_IMAGE_SIZE},
        crop_size={"height": TINY_SCORER_IMAGE_SIZE, "width": TINY_SCORER_IMAGE_SIZE},
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())


def tiny_clip_model(hidden_act: str, seed: int):
    """A seeded random CLIPModel; weights scaled up so that random embeddings give varied cosines."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(hidden_act)).eval()
    with torch.no_grad():
        model.visual_projection.weight.normal_(std=0.5)
        model.text_projection.weight.normal_(std=0.5)
    return model


def transformers_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPModel state dict in open_clip's key layout (fused q/k/v, transposed projections)."""
    out: dict[str, torch.Tensor] = {}

    def blocks(source: str, target: str) -> None:
        index = 0
        while f"{source}.{index}.layer_norm1.weight" in state_dict:
            s, t = f"{source}.{index}", f"{target}.{index}"
            for kind in ("weight", "bias"):
                out[f"{t}.attn.in_proj_{kind}"] = torch.cat(
                    [state_dict[f"{s}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
                )
                for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{t}.{new}.{kind}"] = state_dict[f"{s}.{old}.{kind}"]
            index += 1

    out["visual.class_embedding"] = state_dict["vision_model.embeddings.class_embedding"]
    out["visual.conv1.weight"] = state_dict["vision_model.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = state_dict["vision_model.embeddings.position_embedding.weight"]
    for new, old in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
        for kind in ("weight", "bias"):
            out[f"{new}.{kind}"] = state_dict[f"{old}.{kind}"]
    blocks("vision_model.encoder.layers", "visual.transformer.resblocks")
    blocks("text_model.encoder.layers", "transformer.resblocks")
    out["token_embedding.weight"] = state_dict["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state_dict["text_model.embeddings.position_embedding.weight"]
    out["visual.proj"] = state_dict["visual_projection.weight"].t().contiguous()
    out["text_projection"] = state_dict["text_projection.weight"].t().contiguous()
    out["logit_scale"] = state_dict["logit_scale"]
    return {key: value.clone() for key, value in out.items()}


def build_tiny_scorers(root: Path, seed: int = 0) -> None:
    """Write the tiny scorer folders under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    processor = tiny_clip_processor()

    clip_h = tiny_clip_model("gelu", seed)
    clip_h.save_pretrained(root / TINY_SCORER_FOLDERS["clip_h"])
    processor.save_pretrained(root / TINY_SCORER_FOLDERS["clip_h"])

    tiny_clip_model("gelu", seed + 1).save_pretrained(root / TINY_SCORER_FOLDERS["pickscore"])

    hps = tiny_clip_model("gelu", seed + 2)
    (root / TINY_SCORER_FOLDERS["hpsv2"]).mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": transformers_to_open_clip(hps.state_dict())},
               root / TINY_SCORER_FOLDERS["hpsv2"] / "HPS_v2.1_compressed.pt")

    hps_v2_0 = tiny_clip_model("gelu", seed + 4)
    torch.save({"state_dict": transformers_to_open_clip(hps_v2_0.state_dict())},
               root / TINY_SCORER_FOLDERS["hpsv2"] / "HPS_v2_compressed.pt")

    for folder, model_seed in (("clip_l", seed + 3), ("clip_b", seed + 5)):
        tiny_clip_model("quick_gelu", model_seed).save_pretrained(root / TINY_SCORER_FOLDERS[folder])
        processor.save_pretrained(root / TINY_SCORER_FOLDERS[folder])

    bert = tiny_bert_tokenizer()
    bert.save_pretrained(root / TINY_SCORER_FOLDERS["bert"])
    vocab_size = len(bert) + 2  # BLIP adds [DEC] and [ENC]
    imagereward = root / TINY_SCORER_FOLDERS["imagereward"]
    imagereward.mkdir(parents=True, exist_ok=True)
    release = imagereward_to_release(tiny_imagereward_model(vocab_size, seed + 6).state_dict())
    max_positions = tiny_med_config(vocab_size)["max_position_embeddings"]  # BLIP's BERT saves this buffer too
    release["blip.text_encoder.embeddings.position_ids"] = torch.arange(max_positions).expand((1, -1)).clone()
    for projection in ("vision_proj", "text_proj"):  # BLIP's contrastive heads, saved but unused by the score
        release[f"blip.{projection}.weight"] = torch.randn(16, 32)
        release[f"blip.{projection}.bias"] = torch.zeros(16)
    torch.save(release, imagereward / "ImageReward.pt")
    (imagereward / "med_config.json").write_text(json.dumps(tiny_med_config(vocab_size), indent=2) + "\n")
