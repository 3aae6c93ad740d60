"""The conversations put to the MLLM, as model inputs: chat templates, image fitting, tokenization.

The LLaVA templates are written out here; they follow `conv_llava_v0` and `conv_llava_v1` of the original
LLaVA code-base (haotian-liu/LLaVA, llava/conversation.py):

    llava-v0: "{system}###Human: <image>\\n{question}###Assistant:"          answer: " {answer}###"
    llava-v1: "{system} USER: <image>\\n{question} ASSISTANT:"               answer: " {answer}</s>"

and the text around `<image>` is tokenized chunk by chunk behind one BOS, as LLaVA's
`tokenizer_image_token` does (so "\\n" after the image is tokenized as at the start of a text). Qwen2.5-VL
uses its processor's own chat template. LLaVA images are padded to a square with the image processor's
mean colour before preprocessing ("pad" aspect mode of LLaVA-1.5).
"""

from __future__ import annotations

import torch
from PIL import Image

from img_core.mllm.specs import MLLMSpec

LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# conv_llava_v0: SeparatorStyle.SINGLE, sep "###", roles Human / Assistant.
LLAVA_V0_PROMPT = LLAVA_SYSTEM + "###Human: " + LLAVA_IMAGE_TOKEN + "\n{question}###Assistant:"
LLAVA_V0_ANSWER = " {answer}###"
# conv_llava_v1: SeparatorStyle.TWO, sep " ", sep2 "</s>", roles USER / ASSISTANT.
LLAVA_V1_PROMPT = LLAVA_SYSTEM + " USER: " + LLAVA_IMAGE_TOKEN + "\n{question} ASSISTANT:"
LLAVA_V1_ANSWER = " {answer}</s>"
# llava-v0 answers end with the "###" separator, not with EOS; the other templates end with EOS.
STOP_STRINGS = {"llava-v0": "###"}


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically with `fill` (LLaVA-1.5's "pad" aspect mode)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def encode_llava(
    processor, spec: MLLMSpec, dtype: torch.dtype, image: Image.Image, question: str, answer: str | None
) -> dict[str, torch.Tensor]:
    """LLaVA inputs: BOS + text before <image> + the image tokens + text after (+ the answer), and pixels."""
    image_processor = processor.image_processor
    if spec.image_aspect == "pad":
        image = expand_to_square(image, tuple(int(255 * mean) for mean in image_processor.image_mean))
    # The processor expands one image token to as many as the vision tower yields for this image.
    encoded = processor(text=processor.image_token, images=image, return_tensors="pt")
    num_image_tokens = int((encoded["input_ids"] == processor.image_token_id).sum())

    if spec.chat_template == "llava-v0":
        template, answer_template = LLAVA_V0_PROMPT, LLAVA_V0_ANSWER
    else:
        template, answer_template = LLAVA_V1_PROMPT, LLAVA_V1_ANSWER
    text = template.replace("{question}", question)
    if answer is not None:
        text += answer_template.replace("{answer}", answer)
    before_image, after_image = text.split(LLAVA_IMAGE_TOKEN)
    input_ids = (
        [processor.tokenizer.bos_token_id]
        + processor.tokenizer.encode(before_image, add_special_tokens=False)
        + [processor.image_token_id] * num_image_tokens
        + processor.tokenizer.encode(after_image, add_special_tokens=False)
    )
    input_ids = torch.tensor([input_ids])  # (1, S)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": encoded["pixel_values"].to(dtype),  # (1, 3, H, W)
    }


def encode_qwen(
    processor, spec: MLLMSpec, dtype: torch.dtype, image: Image.Image, question: str, answer: str | None
) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL inputs through its processor's own chat template."""
    if spec.image_aspect == "pad":
        mean = processor.image_processor.image_mean
        image = expand_to_square(image, tuple(int(255 * m) for m in mean))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    text = processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)
    encoded = processor(text=[text], images=[image], return_tensors="pt")
    encoded["pixel_values"] = encoded["pixel_values"].to(dtype)
    return dict(encoded)


def encode_conversation(
    processor, spec: MLLMSpec, dtype: torch.dtype, image: Image.Image, question: str, answer: str | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs (on CPU) for image + question, with `answer` teacher-forced after it when given."""
    if spec.family == "llava":
        return encode_llava(processor, spec, dtype, image, question, answer)
    return encode_qwen(processor, spec, dtype, image, question, answer)
