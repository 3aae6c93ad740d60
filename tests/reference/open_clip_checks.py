"""What HPS v2 is computed with, checked against open_clip itself (open_clip_torch 3.3.0 and ftfy, from
`make reference-packages`), for tests/test_scorers.py:

    PYTHONPATH=.reference-packages:. python tests/reference/open_clip_checks.py

Prints one JSON object:
- `image_max_diff`, `text_max_diff`: a random open_clip ViT CLIP and the CLIPModel that
  `img_core.evaluation.scorers.open_clip_to_transformers` makes of its state dict, on the same pixels and
  token ids (the embeddings' largest absolute difference);
- `cleanup_mismatches`: the prompts (from PROMPTS) where `hps_clean_text(p).lower()` differs from open_clip's
  own cleanup before tokenizing (`ftfy.fix_text`, `html.unescape` twice, whitespace, lower case).
"""

import json

import open_clip
import open_clip.tokenizer
import torch
from transformers import CLIPConfig, CLIPModel

from img_core.evaluation.scorers import hps_clean_text, open_clip_to_transformers

PROMPTS = [
    "A cat’s hat on a “red” chair.",  # curly apostrophe and quotes (12 Parti prompts have them)
    "Fish &amp; chips &amp;amp; peas",  # HTML entities, one escaped twice
    "  A   dog\tand\na cat  ",  # whitespace runs
    "ﬁve ﬂowers in a ＦＵＬＬ-width vase",  # ligatures, full-width letters
    "Café crème brûlée",  # composed accents
    "An astronaut riding a horse.",
]


def conversion_differences() -> tuple[float, float]:
    torch.manual_seed(0)
    vocab = 500
    reference = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=16, image_size=32, patch_size=8),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=vocab, width=48, heads=3, layers=2),
    ).eval()
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=3, hidden_act="gelu", eos_token_id=vocab - 1, bos_token_id=vocab - 2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(open_clip_to_transformers(reference.state_dict()), strict=False)
    assert missing == [] and unexpected == [], (missing, unexpected)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.zeros(2, 77, dtype=torch.long)  # open_clip pools at the highest id: the end token
    ids[0, :6] = torch.tensor([vocab - 2, 5, 17, 33, 8, vocab - 1])
    ids[1, :4] = torch.tensor([vocab - 2, 44, 3, vocab - 1])
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=ids, attention_mask=(ids > 0).long())
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        return (float((image - reference.encode_image(pixels)).abs().max()),
                float((text - reference.encode_text(ids)).abs().max()))


if __name__ == "__main__":
    image_diff, text_diff = conversion_differences()
    mismatches = [p for p in PROMPTS if hps_clean_text(p).lower() != open_clip.tokenizer._clean_lower(p)]
    print(json.dumps({"image_max_diff": image_diff, "text_max_diff": text_diff, "cleanup_mismatches": mismatches,
                      "prompts": len(PROMPTS)}))
