"""ImageReward scores computed by the released `image-reward` 1.5 package's own code, for
tests/test_scorers.py to compare with img_core's port on the same tiny weights.

    PYTHONPATH=.reference-packages:. python tests/reference/imagereward_release.py SCORERS_DIR CASES.json

`make reference-packages` installs the package (with timm and fairscale, without its other dependencies)
into .reference-packages. CASES.json: [{"image": path, "prompt": text}, ...]; prints a JSON list of scores.

Built from the package's modules at the tiny sizes: `models.BLIP.vit.VisionTransformer` (BLIP's ViT),
`models.BLIP.med.BertModel` from the tiny `med_config.json` with `encoder_width` set as BLIP_Pretrain does,
`models.BLIP.blip.init_tokenizer` (its BertTokenizer.from_pretrained pointed at the tiny tokenizer instead of
the hub's bert-base-uncased), `ImageReward.MLP` and `ImageReward._transform`; the weights load as
`ImageReward.utils.load` loads them (`load_state_dict(strict=False)`), and each score is the package's
`ImageReward.score(prompt, image)`. The package's `__init__` is skipped (it imports its training code and
OpenAI's `clip`, neither needed to score).

The package was written for transformers 4. Five names it uses were removed or renamed in transformers 5;
the shims below give them back with transformers 4's behaviour, and none touches a weight, a token or the
arithmetic of a layer: `apply_chunking_to_forward` (from transformers.pytorch_utils; the package never
chunks), `invert_attention_mask` (transformers 4's formula), `get_head_mask` (no head mask is ever passed:
None per layer), `init_weights` (skipped: every weight is loaded from the checkpoint afterwards) and the
tokenizer's `additional_special_tokens_ids` (transformers 5's `extra_special_tokens`, as ids).
"""

import json
import sys
import types
from pathlib import Path

import torch
import transformers.modeling_utils
import transformers.pytorch_utils
from PIL import Image

for helper in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
    if not hasattr(transformers.modeling_utils, helper):  # imported by med.py; only the first is ever called
        setattr(transformers.modeling_utils, helper, getattr(transformers.pytorch_utils, helper, None))


def load_package_modules(root: Path):
    """ImageReward.ImageReward, ...BLIP.vit, ...BLIP.med and ...BLIP.blip, without the package __init__s."""
    for name, folder in (("ImageReward", "ImageReward"), ("ImageReward.models", "ImageReward/models"),
                         ("ImageReward.models.BLIP", "ImageReward/models/BLIP")):
        package = types.ModuleType(name)
        package.__path__ = [str(root / folder)]
        sys.modules[name] = package
    import ImageReward.ImageReward as release
    import ImageReward.models.BLIP.blip as blip
    import ImageReward.models.BLIP.med as med
    import ImageReward.models.BLIP.vit as vit

    return release, blip, med, vit


def invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    """transformers 4's ModuleUtilsMixin.invert_attention_mask."""
    extended = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]).to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def main(scorers_dir: Path, cases: list[dict]) -> list[float]:
    from img_core.tiny.scorers import (
        TINY_IMAGEREWARD_VISION,
        TINY_SCORER_FOLDERS,
        TINY_SCORER_IMAGE_SIZE,
    )

    package_root = next(Path(p) for p in sys.path if (Path(p) / "ImageReward" / "ImageReward.py").is_file())
    release, blip, med, vit = load_package_modules(package_root)
    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = lambda self, head_mask, layers: [None] * layers
    med.BertModel.init_weights = lambda self: None

    folder = scorers_dir / TINY_SCORER_FOLDERS["imagereward"]
    width = TINY_IMAGEREWARD_VISION["hidden_size"]
    visual_encoder = vit.VisionTransformer(
        img_size=TINY_SCORER_IMAGE_SIZE, patch_size=TINY_IMAGEREWARD_VISION["patch_size"], embed_dim=width,
        depth=TINY_IMAGEREWARD_VISION["num_hidden_layers"], num_heads=TINY_IMAGEREWARD_VISION["num_attention_heads"],
        mlp_ratio=TINY_IMAGEREWARD_VISION["intermediate_size"] / width,
    )
    encoder_config = med.BertConfig.from_json_file(str(folder / "med_config.json"))
    encoder_config.encoder_width = width  # as BLIP_Pretrain sets it from the ViT
    text_encoder = med.BertModel(config=encoder_config, add_pooling_layer=False)

    tiny_bert = str(scorers_dir / TINY_SCORER_FOLDERS["bert"])

    class TinyBert(blip.BertTokenizer):  # init_tokenizer asks for the hub's bert-base-uncased
        @classmethod
        def from_pretrained(cls, name):
            return super().from_pretrained(tiny_bert)

        @property
        def additional_special_tokens_ids(self):  # transformers 5 calls them extra special tokens
            return self.convert_tokens_to_ids(self.extra_special_tokens)

    blip.BertTokenizer = TinyBert

    model = release.ImageReward.__new__(release.ImageReward)  # its __init__ builds the full-size ViT-L
    torch.nn.Module.__init__(model)
    model.device = "cpu"
    model.blip = torch.nn.Module()
    model.blip.visual_encoder, model.blip.text_encoder = visual_encoder, text_encoder
    model.blip.tokenizer = blip.init_tokenizer()
    model.preprocess = release._transform(TINY_SCORER_IMAGE_SIZE)
    model.mlp = release.MLP(encoder_config.hidden_size)
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__'s constants
    state_dict = torch.load(folder / "ImageReward.pt", map_location="cpu")
    result = model.load_state_dict(state_dict, strict=False)  # as ImageReward.utils.load
    unused = [key for key in result.unexpected_keys if not key.startswith(("blip.vision_proj", "blip.text_proj"))]
    assert not result.missing_keys and not unused, (result.missing_keys, unused)
    model.eval()
    with torch.no_grad():
        return [model.score(case["prompt"], Image.open(case["image"])) for case in cases]


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))))
