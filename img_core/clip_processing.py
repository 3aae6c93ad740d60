"""CLIP image preprocessing with PIL resizing, as the authors' release computes it (REFERENCE §5).

The released LLaVA and aligners were trained on pixels from transformers 4.37's `CLIPImageProcessor`,
which resizes with PIL. transformers 5's `CLIPImageProcessor` resizes through torchvision instead; its
pixels differ by up to one 8-bit level, which moves the guidance features by ~4e-2 and the IP-Adapter
features by ~2e-2 (max abs, tiny weights) against the release. transformers 5 still ships the PIL-backed
class, `CLIPImageProcessorPil`: `pil_clip_image_processor` turns the processor a model folder comes with
into that class with the same settings (size, crop, mean, std, resample, rescale), and leaves every other
kind of image processor (Qwen2.5-VL's own one, for example) as it is.

    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor = pil_clip_image_processor(processor.image_processor)
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def pil_clip_image_processor(image_processor):
    """The PIL-backed CLIP image processor with `image_processor`'s settings.

    A torchvision-backed `CLIPImageProcessor` is rebuilt as `CLIPImageProcessorPil` from its settings;
    an image processor that already is PIL-backed, or is no CLIP processor, is returned unchanged."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    if image_processor is None or type(image_processor) is not CLIPImageProcessor:
        return image_processor
    settings = image_processor.to_dict()
    settings.pop("image_processor_type", None)
    pil_processor = CLIPImageProcessorPil.from_dict(settings)
    logger.debug("CLIP image processor: PIL resizing (%s)", pil_processor.size)
    return pil_processor
