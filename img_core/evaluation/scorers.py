"""Alignment scorers: one number per (image, prompt), higher is better. `evaluate` and the app use them.

    scorer = load_scorer("hpsv2", device="cuda")
    scores = scorer.score(images, prompts)          # list[float], one per pair
    scorer.unload()                                  # frees the weights (they load lazily on first use)

| name               | what                                   | weights                                        | unit |
| ------------------ | -------------------------------------- | ---------------------------------------------- | ---- |
| `hpsv2`            | HPS v2.1 (the paper's metric)          | xswu/HPSv2 `HPS_v2.1_compressed.pt` (open_clip ViT-H-14 state dict, converted on load) + laion/CLIP-ViT-H-14-laion2B-s32B-b79K (config, tokenizer) | 100 * cos |
| `hpsv2.0`          | HPS v2.0 (the HPS v2 paper's tables)   | xswu/HPSv2 `HPS_v2_compressed.pt`, the rest as `hpsv2` | 100 * cos |
| `pickscore`        | PickScore_v1                           | yuvalkirstain/PickScore_v1 + the CLIP-H processor | logit_scale * cos (~100 * cos) |
| `clipscore`        | CLIPScore as torchmetrics defines it   | openai/clip-vit-large-patch14, the prompt as is | 100 * max(cos, 0) |
| `clipscore-hessel` | CLIP-S of Hessel et al. 2021           | openai/clip-vit-base-patch32, "A photo depicts " + prompt | 2.5 * max(cos, 0) |
| `imagereward`      | ImageReward (Xu et al. 2023)           | THUDM/ImageReward `ImageReward.pt` + `med_config.json`, bert-base-uncased tokenizer (img_core.evaluation.imagereward) | normalised reward (~ -2..2) |
| `vqascore`         | VQAScore (Lin et al. 2024), default judge | llava-1.5-13b, else qwen2.5-vl-7b (tiny: tiny-qwen, else tiny-llava), never the guidance MLLM while another is here | 0..1 |
| `vqascore:<mllm>`  | the same with a named judge MLLM       | any name of img_core.mllm.KNOWN_MLLMS or folder | 0..1 |
| `vqascore:self`    | the same, judged by the guidance MLLM  | none extra: the loaded critic (self-judged)    | 0..1 |
| `vqascore-yesno[:judge]` | earlier variant: yes / (yes + no) | as above                                      | 0..1 |

All CLIP scorers run through transformers' `CLIPModel`. HPS v2.1 is published only as an open_clip
checkpoint (`{"state_dict": ...}`, keys `visual.*`, `transformer.*`, ...); `open_clip_to_transformers`
renames and splits those keys into `CLIPModel`'s (the fused attention `in_proj` becomes q/k/v, the
projection matrices are transposed), the way convert_llava.py converts the released LLaVA. HPS's own
image preprocessing is kept: the longest side resized to 224 (bicubic, on the float tensor), padded to
a square with black, normalised with the CLIP mean/std (HPSv2 `ResizeMaxSize`, light_augmentation=True).
HPS v2 reports diag(image_features @ text_features) of unit vectors; the paper prints it x100 (28.03), so
`hpsv2` returns 100 * cos. HPS tokenizes with open_clip's SimpleTokenizer, which first cleans the text
(HPSv2 `hpsv2/src/open_clip/tokenizer.py`: `ftfy.fix_text`, `html.unescape` twice, strip, runs of whitespace
to one space, lower case); `hps_clean_text` does the same without the ftfy dependency for what ftfy changes
in prompts (curly quotes and apostrophes straightened, Latin ligatures and full-width forms folded, NFC),
but does not repair mojibake. PickScore and CLIPScore use the CLIP image processor with PIL resizing, as the
transformers 4 releases they were defined with (img_core.clip_processing).

VQAScore as published (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text
Generation"; t2v_metrics, linzhiqiu/t2v_metrics, read at commit 74c72089 for LLaVA-1.5 and at HEAD for
Qwen2-VL): the judge reads the image and `Does this figure show "{text}"? Please answer yes or no.` in its
own chat template, the answer "Yes" is appended (teacher-forced) and the score is
exp(mean over the answer's tokens of log softmax(logits)[token]), the softmax over the FULL vocabulary.
"Yes" is one token in the LLaVA-1.5 and Qwen2.5-VL vocabularies, so the score is P("Yes") at the first
answer position, the paper's definition (t2v_metrics' Qwen2-VL path takes the geometric mean of the answer
tokens' probabilities exactly so; its LLaVA-1.5 path also counts the end-of-answer "</s>" after "Yes",
which we do not). The tiny character-level models spell "Yes" in several tokens; the same formula applies.
t2v_metrics' Qwen models capitalise "Yes or No"; we ask every judge the LLaVA-1.5/CLIP-FlanT5 question.

Which judge: a model should not grade its own advice, so `vqascore` uses the first of JUDGE_PREFERENCES
that is not the guidance MLLM and whose weights are already here (tiny presets: the other tiny MLLM;
released presets: the public LLaVA-1.5-13B, t2v_metrics' LLaVA judge, else Qwen2.5-VL-7B). Only when none
is here does the guidance MLLM judge, with a warning; every record then says `self_judged: true`.

`vqascore-yesno` keeps this project's earlier variant: "Does this image show '{prompt}'? Answer yes or no.",
P(yes) = sum p(yes variants) / (sum p(yes variants) + sum p(no variants)) at the first answer token, where
the variants are the first tokens of "Yes"/"yes"/"YES" (and "No"/"no"/"NO"), with and without a leading
space. It is not comparable with published VQAScore numbers.

Tiny random stand-ins for every CLIP scorer are built by img_core.tiny.scorers with the same classes.
"""

from __future__ import annotations

import dataclasses
import gc
import html
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from img_core.clip_processing import pil_clip_image_processor
from img_core.errors import IMGError, InvalidInputError
from img_core.evaluation.imagereward import (
    IMAGEREWARD,
    IMAGEREWARD_SCORER,
    ImageRewardSpec,
    imagereward_pixel_values,
    load_imagereward,
)
from img_core.hub import download_file, from_pretrained_or_explain
from img_core.mllm import resolve_spec
from img_core.mllm.loading import load_mllm
from img_core.tiny.scorers import (
    ensure_tiny_scorers,
    tiny_imagereward_overrides,
    tiny_scorer_overrides,
)

logger = logging.getLogger(__name__)

CLIP_H_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VQA_SCORER = "vqascore"  # the published VQAScore (Lin et al. 2024, t2v_metrics)
VQA_YESNO_SCORER = "vqascore-yesno"  # this project's earlier variant, yes / (yes + no)
VQA_METHODS = (VQA_SCORER, VQA_YESNO_SCORER)
SELF_JUDGE = "self"  # `vqascore:self`: the guidance MLLM judges (self-judged)
VQA_QUESTION = 'Does this figure show "{text}"? Please answer yes or no.'  # t2v_metrics' LLaVA-1.5 / CLIP-FlanT5
VQA_ANSWER = "Yes"
YESNO_QUESTION = "Does this image show '{prompt}'? Answer yes or no."
YES_WORDS = ("Yes", "yes", "YES")
NO_WORDS = ("No", "no", "NO")
# Default judges, in order of preference; the first available one that is not the guidance MLLM is used.
JUDGE_PREFERENCES = {"released": ("llava-1.5-13b", "qwen2.5-vl-7b"), "tiny": ("tiny-qwen", "tiny-llava")}
CLIP_TEXT_TOKENS = 77  # CLIP's context length: longer prompts are truncated, as every CLIP metric does


class NonFiniteScoreError(IMGError, FloatingPointError):
    """A scorer produced NaN or infinity (broken weights or inputs): the scores are not used or saved."""


class Scorer(Protocol):
    name: str
    self_judged: bool  # the guidance MLLM grades its own advice (VQAScore without another judge)

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]: ...

    def unload(self) -> None: ...


@dataclass(frozen=True)
class CLIPScorerSpec:
    """Where a CLIP-based metric's weights live and how its number is made."""

    name: str
    model_id: str  # transformers CLIPModel folder/id; for open_clip checkpoints the config source
    processor_id: str  # tokenizer + image processor
    open_clip_checkpoint: tuple[str, str] | None = None  # (repo, filename) of an open_clip state dict
    scale: str = "constant"  # "constant": scale_value * cos; "logit_scale": the model's exp(logit_scale) * cos
    clamp_at_zero: bool = False  # CLIPScore: 100 * max(cos, 0)
    preprocessing: str = "processor"  # "processor": the CLIP image processor; "hps": HPS v2's resize-and-pad
    scale_value: float = 100.0  # the factor when scale == "constant"
    text_prefix: str = ""  # Hessel et al.'s CLIP-S: "A photo depicts "
    clean_text: bool = False  # open_clip's text cleanup before tokenizing (HPS)


CLIP_SCORERS: dict[str, CLIPScorerSpec] = {
    "hpsv2": CLIPScorerSpec(
        "hpsv2", CLIP_H_ID, CLIP_H_ID, open_clip_checkpoint=("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
        preprocessing="hps", clean_text=True,
    ),
    "hpsv2.0": CLIPScorerSpec(
        "hpsv2.0", CLIP_H_ID, CLIP_H_ID, open_clip_checkpoint=("xswu/HPSv2", "HPS_v2_compressed.pt"),
        preprocessing="hps", clean_text=True,
    ),
    "pickscore": CLIPScorerSpec("pickscore", "yuvalkirstain/PickScore_v1", CLIP_H_ID, scale="logit_scale"),
    "clipscore": CLIPScorerSpec(
        "clipscore", "openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14", clamp_at_zero=True
    ),
    "clipscore-hessel": CLIPScorerSpec(
        "clipscore-hessel", "openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32", clamp_at_zero=True,
        scale_value=2.5, text_prefix="A photo depicts ",
    ),
}
# ftfy's uncurl_quotes: U+02BC and U+2018..U+201B become ', U+201C..U+201F become "
CURLY_QUOTES = str.maketrans({**{chr(c): "'" for c in (0x02BC, *range(0x2018, 0x201C))},
                              **{chr(c): '"' for c in range(0x201C, 0x2020)}})
LIGATURES_AND_WIDTH = re.compile("[\ufb00-\ufb06\uff01-\uff5e\u3000]")  # folded by NFKC, as ftfy does
SCORER_NAMES = (*CLIP_SCORERS, IMAGEREWARD_SCORER, *VQA_METHODS)


def check_scorer_names(names: list[str]) -> list[str]:
    """The names, stripped and validated (cheap: loads nothing)."""
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise InvalidInputError(f"name at least one scorer: {', '.join(SCORER_NAMES)}")
    for name in names:
        if name not in CLIP_SCORERS and name != IMAGEREWARD_SCORER and parse_vqa_name(name) is None:
            raise InvalidInputError(
                f"unknown scorer {name!r}: use {', '.join(SCORER_NAMES)}, vqascore:<mllm> for a named judge or "
                "vqascore:self for the guidance MLLM"
            )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"scorer named twice in {names}")
    return names


def scorer_needs_own_weights(name: str, guidance_mllm: str | None = None, tiny_root: str | Path | None = None) -> bool:
    """False only for a VQAScore whose judge is the session's loaded MLLM (`vqascore:self`, or `vqascore`
    when no other judge is available)."""
    return parse_vqa_name(name) is None or vqa_judge(name, guidance_mllm, tiny_root) != SELF_JUDGE


def vqa_judge(name: str, guidance_mllm: str | None, tiny_root: str | Path | None = None) -> str:
    """The judge a VQAScore scorer name resolves to: an MLLM name, or SELF_JUDGE (the guidance MLLM)."""
    parsed = parse_vqa_name(name)
    judge = parsed.judge or default_judge(guidance_mllm, tiny_root) or SELF_JUDGE
    return SELF_JUDGE if judge == guidance_mllm else judge


def describe_scorer(name: str, guidance_mllm: str | None, tiny_root: str | Path | None = None) -> dict:
    """What a record says a scorer is (loads nothing): the weights of a CLIP metric; for VQAScore the method,
    its question, the judge and whether it is the guidance MLLM (`self_judged`)."""
    check_scorer_names([name])
    if name in CLIP_SCORERS:
        spec = CLIP_SCORERS[name]
        return {"weights": "/".join(spec.open_clip_checkpoint) if spec.open_clip_checkpoint else spec.model_id,
                "tiny": tiny_root is not None}
    if name == IMAGEREWARD_SCORER:
        return {"weights": f"{IMAGEREWARD.repo}/{IMAGEREWARD.checkpoint}", "tiny": tiny_root is not None}
    parsed = parse_vqa_name(name)
    judge = vqa_judge(name, guidance_mllm, tiny_root)
    return {"method": parsed.method, "question": VQA_QUESTION if parsed.method == VQA_SCORER else YESNO_QUESTION,
            "judge": guidance_mllm if judge == SELF_JUDGE else judge, "self_judged": judge == SELF_JUDGE}


def load_scorer(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tiny_root: str | Path | None = None,
    critic=None,
    quantization: str | None = None,
    guidance_mllm: str | None = None,
) -> Scorer:
    """A scorer by name (weights load on first `score`). `tiny_root`: use the tiny random stand-ins built
    under it by img_core.tiny.scorers (tiny presets). `critic`: the session's loaded MLLMCritic, which a
    self-judged VQAScore uses; `guidance_mllm` (default: the critic's name) decides the default judge."""
    check_scorer_names([name])
    if name in CLIP_SCORERS:
        spec = CLIP_SCORERS[name]
        if tiny_root is not None:
            spec = dataclasses.replace(spec, **tiny_scorer_overrides(name, ensure_tiny_scorers(tiny_root)))
        return CLIPScorer(spec, device=device, dtype=dtype)
    if name == IMAGEREWARD_SCORER:
        spec = IMAGEREWARD
        if tiny_root is not None:
            spec = dataclasses.replace(spec, **tiny_imagereward_overrides(ensure_tiny_scorers(tiny_root)))
        return ImageRewardScorer(spec, device=device, dtype=dtype)
    return load_vqa_scorer(name, device, tiny_root, critic, quantization, guidance_mllm)


def _check_pairs(images: list, prompts: list[str]) -> None:
    if len(images) != len(prompts):
        raise InvalidInputError(f"score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    for image in images:
        if not isinstance(image, Image.Image):
            raise InvalidInputError(f"score takes PIL images, got {type(image).__name__}")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError(f"score needs non-empty prompt strings, got {prompt!r}")


def _checked_scores(name: str, values: torch.Tensor) -> list[float]:
    if not torch.isfinite(values).all():
        raise NonFiniteScoreError(f"scorer {name} produced non-finite scores {values.tolist()}: check its weights "
                                  "(a damaged download gives NaN) and the images; nothing was saved")
    return [float(value) for value in values]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ CLIP metrics


def hps_clean_text(text: str) -> str:
    """open_clip's cleanup before HPS tokenizes (see the module docstring): quotes, ligatures, width, HTML
    entities, whitespace. Lower-casing is left to the CLIP tokenizer, which does it too."""
    text = unicodedata.normalize("NFC", text).translate(CURLY_QUOTES)
    text = LIGATURES_AND_WIDTH.sub(lambda match: unicodedata.normalize("NFKC", match.group()), text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict (ViT vision tower + text transformer) to `CLIPModel` keys.
    A key this conversion does not know (another architecture: attention pooling, a text pooler, ...) is
    refused, never dropped."""
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    class Tracked(dict):  # remembers every key read: what is left over is what this conversion does not know
        def __getitem__(self, key):
            used.add(key)
            return super().__getitem__(key)

    state_dict = Tracked(state_dict)

    def blocks(source: str, target: str) -> None:
        index = 0
        while f"{source}.{index}.ln_1.weight" in state_dict:
            s, t = f"{source}.{index}", f"{target}.{index}"
            q, k, v = state_dict[f"{s}.attn.in_proj_weight"].chunk(3, dim=0)  # (3 W, W) -> 3 x (W, W)
            q_bias, k_bias, v_bias = state_dict[f"{s}.attn.in_proj_bias"].chunk(3, dim=0)
            for projection, weight, bias in (("q", q, q_bias), ("k", k, k_bias), ("v", v, v_bias)):
                converted[f"{t}.self_attn.{projection}_proj.weight"] = weight
                converted[f"{t}.self_attn.{projection}_proj.bias"] = bias
            renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                       "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            for old, new in renames.items():
                for kind in ("weight", "bias"):
                    converted[f"{t}.{new}.{kind}"] = state_dict[f"{s}.{old}.{kind}"]
            index += 1
        if index == 0:
            raise InvalidInputError(f"not an open_clip CLIP checkpoint: no {source}.0.* keys")

    vision, text = "vision_model", "text_model"
    converted[f"{vision}.embeddings.class_embedding"] = state_dict["visual.class_embedding"]
    converted[f"{vision}.embeddings.patch_embedding.weight"] = state_dict["visual.conv1.weight"]
    converted[f"{vision}.embeddings.position_embedding.weight"] = state_dict["visual.positional_embedding"]
    for old, new in (("visual.ln_pre", f"{vision}.pre_layrnorm"), ("visual.ln_post", f"{vision}.post_layernorm"),
                     ("ln_final", f"{text}.final_layer_norm")):
        for kind in ("weight", "bias"):
            converted[f"{new}.{kind}"] = state_dict[f"{old}.{kind}"]
    blocks("visual.transformer.resblocks", f"{vision}.encoder.layers")
    blocks("transformer.resblocks", f"{text}.encoder.layers")
    converted[f"{text}.embeddings.token_embedding.weight"] = state_dict["token_embedding.weight"]
    converted[f"{text}.embeddings.position_embedding.weight"] = state_dict["positional_embedding"]
    converted["visual_projection.weight"] = state_dict["visual.proj"].t().contiguous()  # (W, E) -> (E, W)
    converted["text_projection.weight"] = state_dict["text_projection"].t().contiguous()
    converted["logit_scale"] = state_dict["logit_scale"].reshape(())
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise InvalidInputError(f"the open_clip checkpoint holds {len(unknown)} weights this conversion does not know "
                                f"({', '.join(unknown[:5])}): it is not the ViT CLIP the scorer expects")
    return converted


def load_open_clip_checkpoint(repo: str, filename: str) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip checkpoint file (`{"state_dict": ...}` or a bare state dict)."""
    path = download_file(repo, filename)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged or non-tensor pickle is the user's file to replace
        raise InvalidInputError(f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error}); "
                                f"download {repo}/{filename} again") from error
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InvalidInputError(f"{path} holds no state dict of tensors")
    return state_dict


def hps_pixel_values(images: list[Image.Image], size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """HPS v2's evaluation preprocessing: longest side -> `size` (bicubic), centred black padding to a
    square, CLIP normalisation. Returns (B, 3, size, size)."""
    import torchvision.transforms.functional as F

    batch = []
    for image in images:
        pixels = F.to_tensor(image.convert("RGB"))  # (3, H, W) in [0, 1]
        height, width = pixels.shape[1:]
        scale = size / max(height, width)
        if scale != 1.0:
            new_height, new_width = round(height * scale), round(width * scale)
            pixels = F.resize(pixels, [new_height, new_width], interpolation=F.InterpolationMode.BICUBIC)
            pad_h, pad_w = size - new_height, size - new_width
            pixels = F.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        batch.append(F.normalize(pixels, mean=mean, std=std))
    return torch.stack(batch)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions return the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScorer:
    """A CLIP-family metric: cosine of the image and text embeddings, scaled as its spec says."""

    def __init__(self, spec: CLIPScorerSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.spec = spec
        self.name = spec.name
        self.self_judged = False  # a CLIP metric has no judge
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = None
        self.processor = None

    def load(self) -> "CLIPScorer":
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        if self.model is not None:
            return self

        spec = self.spec
        processor = from_pretrained_or_explain(CLIPProcessor, spec.processor_id)
        # PickScore and CLIPScore were defined on transformers 4's PIL resizing (REFERENCE §5)
        processor.image_processor = pil_clip_image_processor(processor.image_processor)
        if spec.open_clip_checkpoint is None:
            model = from_pretrained_or_explain(CLIPModel, spec.model_id, dtype=self.dtype)
        else:
            from accelerate import init_empty_weights

            config = from_pretrained_or_explain(CLIPConfig, spec.model_id)
            state_dict = open_clip_to_transformers(load_open_clip_checkpoint(*spec.open_clip_checkpoint))
            with init_empty_weights(include_buffers=False):  # parameters on "meta": no random init of 1 B weights
                model = CLIPModel(config)
            missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
            if missing or unexpected:
                raise InvalidInputError(
                    f"{'/'.join(spec.open_clip_checkpoint)} does not fit {spec.model_id}'s CLIP architecture "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            model = model.to(dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.processor = processor
        logger.info("loaded scorer %s (%s, %s)", self.name, spec.model_id, self.dtype)
        return self

    def unload(self) -> None:
        self.model = None
        self.processor = None
        _free_memory()

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        _check_pairs(images, prompts)
        if not images:
            return []
        self.load()
        image_processor = self.processor.image_processor
        if self.spec.preprocessing == "hps":
            size = int(self.model.config.vision_config.image_size)
            pixel_values = hps_pixel_values(images, size, image_processor.image_mean, image_processor.image_std)
        else:
            pixel_values = image_processor(images=[image.convert("RGB") for image in images],
                                           return_tensors="pt")["pixel_values"]
        prompts = [self.spec.text_prefix + (hps_clean_text(p) if self.spec.clean_text else p) for p in prompts]
        text = self.processor.tokenizer(prompts, padding="max_length", truncation=True,
                                        max_length=CLIP_TEXT_TOKENS, return_tensors="pt")
        image_embeds = _pooled(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        text_embeds = _pooled(self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        ))
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)  # (B,)
        if self.spec.clamp_at_zero:
            cosine = cosine.clamp(min=0)
        scale = self.model.logit_scale.float().exp() if self.spec.scale == "logit_scale" else self.spec.scale_value
        return _checked_scores(self.name, (scale * cosine).cpu())


# ----------------------------------------------------------------------------------------------- ImageReward


class ImageRewardScorer:
    """ImageReward (img_core.evaluation.imagereward): weights load lazily on the first `score`."""

    def __init__(self, spec: ImageRewardSpec = IMAGEREWARD, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        self.spec = spec
        self.name = IMAGEREWARD_SCORER
        self.self_judged = False  # no judge: a reward model trained on human preferences
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32  # the release scores in float32
        self.model = None
        self.tokenizer = None

    def load(self) -> "ImageRewardScorer":
        if self.model is None:
            model, self.tokenizer = load_imagereward(self.spec)
            self.model = model.to(self.device, self.dtype)
            logger.info("loaded scorer %s (%s, %s)", self.name, self.spec.repo, self.dtype)
        return self

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
        _free_memory()

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        _check_pairs(images, prompts)
        if not images:
            return []
        self.load()
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.spec.max_length,
                              return_tensors="pt")
        pixel_values = imagereward_pixel_values(images, self.spec.image_size).to(self.device, self.dtype)
        rewards = self.model(pixel_values, text["input_ids"].to(self.device), text["attention_mask"].to(self.device))
        return _checked_scores(self.name, rewards.float().cpu())


# ----------------------------------------------------------------------------------------------- VQAScore


@dataclass(frozen=True)
class VQAScorerName:
    """`method[:judge]`: method `vqascore` or `vqascore-yesno`; judge None (the default judge), "self" (the
    guidance MLLM of the session) or an MLLM name/folder."""

    method: str
    judge: str | None


def parse_vqa_name(name: str) -> VQAScorerName | None:
    """The parts of a VQAScore scorer name, or None for any other scorer."""
    method, _, judge = name.partition(":")
    if method not in VQA_METHODS:
        return None
    return VQAScorerName(method, judge or None)


def judge_is_available(mllm: str, tiny_root: str | Path | None) -> bool:
    """A judge counts as available when its weights are here already: never a surprise 26 GB download."""

    try:
        spec = resolve_spec(mllm, Path(tiny_root) if tiny_root else None)
    except InvalidInputError:
        return False
    if Path(spec.model_id).is_absolute():
        return (Path(spec.model_id) / "config.json").is_file()
    # deferred: only hub judges need the hub client
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec.model_id, "config.json"), str)


def default_judge(guidance_mllm: str | None, tiny_root: str | Path | None = None) -> str | None:
    """The first available judge of JUDGE_PREFERENCES that is not the guidance MLLM; None if there is none
    (the caller then judges with the guidance MLLM and records `self_judged`)."""
    preferences = JUDGE_PREFERENCES["tiny" if tiny_root is not None else "released"]
    for judge in preferences:
        if judge != guidance_mllm and judge_is_available(judge, tiny_root):
            return judge
    return None


def load_vqa_scorer(name: str, device, tiny_root, critic, quantization, guidance_mllm: str | None) -> "VQAScorer":
    """The VQAScore scorer `name`; see the module docstring for how the judge is chosen."""
    guidance = guidance_mllm or (critic.spec.name if critic is not None else None)
    parsed = parse_vqa_name(name)
    judge = vqa_judge(name, guidance, tiny_root)
    if judge == SELF_JUDGE and critic is not None:
        if parsed.judge is None:
            logger.warning("%s: no judge other than the guidance MLLM %s is available here; it grades its own "
                           "work (recorded as self_judged)", name, guidance)
        scorer = VQAScorer(critic, name=name)
    elif judge == SELF_JUDGE and parsed.judge in (None, SELF_JUDGE):
        raise InvalidInputError(f"{name} judges with the session's MLLM: load a session first, or name a judge "
                                f"with {parsed.method}:<mllm>")
    else:
        mllm = parsed.judge if judge == SELF_JUDGE else judge  # the guidance MLLM named explicitly: its own copy
        scorer = VQAScorer.for_judge(mllm, device=device, tiny_root=tiny_root, quantization=quantization, name=name)
        scorer.judge = mllm
    scorer.method = parsed.method
    scorer.self_judged = judge == SELF_JUDGE
    return scorer


def answer_token_ids(tokenizer, words: tuple[str, ...]) -> set[int]:
    """Ids of the first token of each word, with and without a leading space (whitespace-only pieces skipped)."""
    ids = set()
    for word in words:
        for text in (word, " " + word):
            for token_id in tokenizer.encode(text, add_special_tokens=False):
                if tokenizer.decode([token_id]).strip():
                    ids.add(int(token_id))
                    break
    return ids


class VQAScorer:
    """P(the MLLM answers "Yes") that the image shows the prompt. Reuses a loaded critic or loads a judge.

    `method` "vqascore": the published VQAScore; "vqascore-yesno": this project's earlier yes/(yes+no)
    variant. `judge` names the MLLM that answers, `self_judged` says whether it is the guidance MLLM."""

    def __init__(self, critic, name: str = VQA_SCORER, owns_critic: bool = False):
        self.critic = critic
        self.name = name
        self.owns_critic = owns_critic
        self.method = VQA_SCORER
        self.judge = critic.spec.name if critic is not None else None
        self.self_judged = False
        self._judge_loader = None
        self._answer_ids: tuple[list[int], list[int]] | None = None

    @classmethod
    def for_judge(cls, mllm: str, device="cpu", tiny_root=None, quantization=None, name=None) -> "VQAScorer":
        """A scorer with its own MLLM (loaded on first use), so the critic does not grade its own advice."""
        scorer = cls(None, name=name or f"{VQA_SCORER}:{mllm}", owns_critic=True)

        def load_judge():
            return load_mllm(mllm, device=device, quantization=quantization, tiny_root=tiny_root)

        scorer._judge_loader = load_judge
        return scorer

    def provenance(self) -> dict:
        """What a record says about this score: the method, its question, the judge, whether it is self-judged."""
        question = VQA_QUESTION if self.method == VQA_SCORER else YESNO_QUESTION
        return {"method": self.method, "question": question, "judge": self.judge, "self_judged": self.self_judged}

    def unload(self) -> None:
        if self.owns_critic:
            self.critic = None
            _free_memory()

    def _yes_no_ids(self) -> tuple[list[int], list[int]]:
        if self._answer_ids is None:
            yes, no = answer_token_ids(self.critic.tokenizer, YES_WORDS), answer_token_ids(self.critic.tokenizer, NO_WORDS)
            shared = yes & no
            yes, no = sorted(yes - shared), sorted(no - shared)
            if not yes or not no:
                raise InvalidInputError(f"MLLM {self.critic.spec.name}'s tokenizer has no distinct yes/no tokens")
            self._answer_ids = (yes, no)
        return self._answer_ids

    def _encode(self, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
        encode = getattr(self.critic, "encode_conversation", None) or self.critic._encode
        inputs = encode(image.convert("RGB"), question, None)
        return {key: value.to(self.critic.device) for key, value in inputs.items()}

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        _check_pairs(images, prompts)
        if self.critic is None:
            self.critic = self._judge_loader()
            self.judge = self.judge or self.critic.spec.name
        score_one = self._published_score if self.method == VQA_SCORER else self._yes_no_score
        return _checked_scores(self.name, torch.stack([score_one(i, p) for i, p in zip(images, prompts)]).cpu())

    def _published_score(self, image: Image.Image, prompt: str) -> torch.Tensor:
        """exp(mean log p(answer token | question, earlier answer tokens)) over the full vocabulary, the answer
        "Yes" teacher-forced in the judge's chat template; P("Yes") where "Yes" is one token."""
        question = VQA_QUESTION.format(text=prompt.strip())
        prompt_length = self._encode(image, question)["input_ids"].shape[1]
        inputs = self._encode_with_answer(image, question)
        answer_positions = self._answer_positions(inputs["input_ids"][0], prompt_length)  # (A,)
        logits = self.critic.model(**inputs, use_cache=False).logits[0].float()  # (S, V)
        log_probabilities = logits[answer_positions - 1].log_softmax(dim=-1)  # (A, V): position t - 1 predicts t
        answer_ids = inputs["input_ids"][0, answer_positions]  # (A,)
        return log_probabilities.gather(1, answer_ids[:, None])[:, 0].mean().exp()

    def _encode_with_answer(self, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
        encode = getattr(self.critic, "encode_conversation", None) or self.critic._encode
        inputs = encode(image.convert("RGB"), question, VQA_ANSWER)
        return {key: value.to(self.critic.device) for key, value in inputs.items()}

    def _answer_positions(self, input_ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """Positions of the answer's tokens: the fewest tokens after the question that decode to "Yes"."""
        tokenizer = self.critic.tokenizer
        for count in range(1, len(VQA_ANSWER) + 2):
            pieces = input_ids[prompt_length : prompt_length + count].tolist()
            if tokenizer.decode(pieces).strip() == VQA_ANSWER:
                return torch.arange(prompt_length, prompt_length + count, device=input_ids.device)
        raise InvalidInputError(f"MLLM {self.critic.spec.name}: the answer {VQA_ANSWER!r} is not where its chat "
                                "template should put it; VQAScore cannot be read from this model")

    def _yes_no_score(self, image: Image.Image, prompt: str) -> torch.Tensor:
        """The earlier variant: P(yes variants) / (P(yes variants) + P(no variants)) at the first answer token."""
        yes, no = self._yes_no_ids()
        inputs = self._encode(image, YESNO_QUESTION.format(prompt=prompt.strip()))
        logits = self.critic.model(**inputs, use_cache=False).logits[0, -1].float()  # (V,) next token
        probabilities = logits.softmax(dim=-1)
        p_yes, p_no = probabilities[yes].sum(), probabilities[no].sum()
        return p_yes / (p_yes + p_no).clamp(min=torch.finfo(torch.float32).tiny)
