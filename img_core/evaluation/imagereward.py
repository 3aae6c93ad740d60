"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"): a BLIP ViT-L/16 reads the image, a BERT with cross-attention reads the prompt against it, and
an MLP on the [CLS] state gives one reward, normalised by the training set's mean and std.

    model = load_imagereward(IMAGEREWARD)            # img_core.evaluation.scorers' `imagereward` wraps this
    rewards = model(pixel_values, input_ids, attention_mask)   # about -2 (bad) .. +2 (good), 0: the mean

This is a port onto transformers' BLIP classes (`BlipVisionModel`, `BlipTextModel`) of the released
scorer, read from THUDM/ImageReward (the `image-reward` 1.5 package, `ImageReward/ImageReward.py`,
`models/BLIP/{vit,med,blip}.py`); the package itself needs transformers 4, timm 0.6 and fairscale. Its
`ImageReward.score(prompt, image)`:
- text: `bert-base-uncased` with `[DEC]` (bos) and `[ENC]` added (BLIP's `init_tokenizer`), padded to
  max_length 35, truncated; the ids start with [CLS], as the released score uses them;
- image: Resize(224, bicubic) on the PIL image, CenterCrop(224), then RGB, ToTensor, the CLIP mean/std;
- `visual_encoder(image)` (ViT-L/16, 24 layers, LayerNorm eps 1e-6, the final norm applied) gives every
  token; the text encoder (12 BERT layers, each with cross-attention to all image tokens, no causal mask)
  reads the prompt; its [CLS] state goes through `mlp` (Linear 768-1024-128-64-16-1, dropouts between,
  no activations) and `(reward - 0.16717362830052426) / 1.0333394966054072`.
`ImageReward.pt` holds `blip.visual_encoder.*`, `blip.text_encoder.*` and `mlp.layers.*` (plus BLIP's
unused `vision_proj`/`text_proj`); `convert_imagereward_checkpoint` renames them to these classes' keys
and refuses any key it does not know. The hub's `med_config.json` gives the BERT's sizes.
`tests/test_scorers.py` checks the port against the package's own modules on tiny random weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
from PIL import Image

from img_core.errors import InvalidInputError
from img_core.hub import download_file, from_pretrained_or_explain

IMAGEREWARD_SCORER = "imagereward"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # the MLP after the text encoder's [CLS] state
HEAD_INDICES = (0, 2, 4, 6, 7)  # their positions in the release's nn.Sequential (dropouts between)
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive projections: score skips them
# The release's ViT keys and BlipVisionModel's: outside the blocks, and inside block i
# (`blip.visual_encoder.blocks.{i}.<name>` -> `vision_model.encoder.layers.{i}.<name>`).
RELEASE_VISION_KEYS = {
    "blip.visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "blip.visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "blip.visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "blip.visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "blip.visual_encoder.norm.weight": "vision_model.post_layernorm.weight",
    "blip.visual_encoder.norm.bias": "vision_model.post_layernorm.bias",
}
RELEASE_BLOCK_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                         "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
BLIP_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "patch_size": 16}  # BLIP's create_vit("large")


@dataclass(frozen=True)
class ImageRewardSpec:
    """Where ImageReward's files live and the sizes the checkpoint does not state."""

    repo: str = "THUDM/ImageReward"
    checkpoint: str = "ImageReward.pt"
    med_config: str = "med_config.json"  # the BERT's sizes
    tokenizer_id: str = "bert-base-uncased"
    vision: dict = field(default_factory=lambda: dict(BLIP_VIT_L))
    image_size: int = 224
    max_length: int = 35  # the release pads and truncates every prompt to 35 tokens
    mean: float = 0.16717362830052426
    std: float = 1.0333394966054072


IMAGEREWARD = ImageRewardSpec()


def imagereward_tokenizer(tokenizer_id: str):
    """BLIP's tokenizer: BERT's with `[DEC]` as bos and `[ENC]` as an extra special token (30,524 ids)."""
    from transformers import BertTokenizer

    tokenizer = from_pretrained_or_explain(BertTokenizer, tokenizer_id)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def text_config_from_med(med: dict, vision_width: int):
    """transformers' BlipTextConfig for the release's BERT (`med_config.json`), cross-attending to
    `vision_width`-wide image tokens (BLIP sets `encoder_width` to the ViT's width)."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise InvalidInputError("med_config.json does not describe BLIP's cross-attention BERT (add_cross_attention)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise InvalidInputError(f"med_config.json: position embeddings {med['position_embedding_type']!r} are not "
                                "supported (BLIP uses absolute ones)")
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=vision_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation ids: the scorer only encodes
    )


def vision_config(spec: ImageRewardSpec):
    """transformers' BlipVisionConfig for BLIP's ViT (LayerNorm eps 1e-6, exact GELU)."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(**spec.vision, image_size=spec.image_size, layer_norm_eps=1e-6, hidden_act="gelu",
                            attention_dropout=0.0)


class ImageRewardModel(torch.nn.Module):
    """The released scorer's network on transformers' BLIP classes; forward gives the normalised reward."""

    def __init__(self, vision, text, mean: float, std: float):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        widths = (text.hidden_size, *HEAD_WIDTHS)
        self.head = torch.nn.Sequential(*(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])))
        self.mean, self.std = mean, std

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, Dv)
        text = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device),
        )
        reward = self.head(text.last_hidden_state[:, 0, :].float())  # the [CLS] state -> (B, 1)
        return ((reward - self.mean) / self.std).squeeze(-1)


def convert_imagereward_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ImageReward.pt`'s keys as ImageRewardModel's. A key this conversion does not know is refused."""
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    vision_renames, fixed = RELEASE_BLOCK_RENAMES, RELEASE_VISION_KEYS
    head = {f"mlp.layers.{index}.{kind}": f"head.{position}.{kind}"
            for position, index in enumerate(HEAD_INDICES) for kind in ("weight", "bias")}
    block = re.compile(r"blip\.visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)")
    converted, unknown = {}, []
    for key, value in state_dict.items():
        match = block.fullmatch(key)
        if key in fixed:
            converted[fixed[key]] = value
        elif key in head:
            converted[head[key]] = value
        elif match and match.group(2) in vision_renames:
            index, name, kind = match.groups()
            converted[f"vision_model.encoder.layers.{index}.{vision_renames[name]}.{kind}"] = value
        elif key.startswith("blip.text_encoder."):
            if not key.endswith("embeddings.position_ids"):  # a buffer of 0..N-1, rebuilt by the class
                converted["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif not key.startswith(UNUSED_PREFIXES):
            unknown.append(key)
    if unknown:
        raise InvalidInputError(f"the ImageReward checkpoint holds {len(unknown)} weights this conversion does not "
                                f"know ({', '.join(sorted(unknown)[:5])}): it is not the released ImageReward")
    return converted


def imagereward_pixel_values(images: list[Image.Image], size: int) -> torch.Tensor:
    """The release's preprocessing, in its order: Resize(size, bicubic) of the PIL image, CenterCrop(size),
    then RGB, ToTensor and the CLIP mean/std. Returns (B, 3, size, size)."""
    import torchvision.transforms.functional as F

    batch = []
    for image in images:
        image = F.center_crop(F.resize(image, size, interpolation=F.InterpolationMode.BICUBIC), [size, size])
        batch.append(F.normalize(F.to_tensor(image.convert("RGB")), mean=CLIP_MEAN, std=CLIP_STD))
    return torch.stack(batch)


def load_imagereward(spec: ImageRewardSpec = IMAGEREWARD) -> tuple[ImageRewardModel, object]:
    """(model on the CPU in float32, tokenizer) from the spec's files (hub ids or local folders)."""
    from accelerate import init_empty_weights

    med_path = download_file(spec.repo, spec.med_config)
    try:
        med = json.loads(med_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{med_path} is not readable JSON ({error}); download it again") from error
    vision = vision_config(spec)
    text = text_config_from_med(med, vision.hidden_size)
    path = download_file(spec.repo, spec.checkpoint)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged or non-tensor pickle is the user's file to replace
        raise InvalidInputError(f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error}); "
                                f"download {spec.repo}/{spec.checkpoint} again") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InvalidInputError(f"{path} holds no state dict of tensors")
    with init_empty_weights(include_buffers=False):  # parameters on "meta": no random init of 470 M weights
        model = ImageRewardModel(vision, text, spec.mean, spec.std)
    try:
        model.load_state_dict(convert_imagereward_checkpoint(state_dict), strict=True, assign=True)
    except RuntimeError as error:  # missing keys or other shapes: not the architecture the spec describes
        raise InvalidInputError(f"{spec.repo}/{spec.checkpoint} does not fit ImageReward's architecture "
                                f"({str(error).splitlines()[0]} ...)") from error
    tokenizer = imagereward_tokenizer(spec.tokenizer_id)
    if len(tokenizer) > text.vocab_size:
        raise InvalidInputError(f"the tokenizer {spec.tokenizer_id} has {len(tokenizer)} ids, the checkpoint's BERT "
                                f"{text.vocab_size}")
    return model.eval(), tokenizer
