"""The multimodal LLM side of IMG, one concept per module:

  * `specs`        - which MLLMs exist and where their weights are (`MLLMSpec`, `KNOWN_MLLMS`, `resolve_spec`)
  * `quantization` - loading them in less memory (`QUANTIZATIONS`, `quantization_config`, `tensor_bytes`)
  * `chat`         - the conversation as model inputs (chat templates, image padding, tokenization)
  * `critic`       - `MLLMCritic`: a loaded MLLM that writes critiques and yields guidance features
"""

from img_core.mllm.chat import (
    LLAVA_IMAGE_TOKEN,
    LLAVA_SYSTEM,
    LLAVA_V0_ANSWER,
    LLAVA_V0_PROMPT,
    LLAVA_V1_ANSWER,
    LLAVA_V1_PROMPT,
    STOP_STRINGS,
    encode_conversation,
    expand_to_square,
)
from img_core.mllm.critic import MIN_CRITIQUE_TOKENS, MLLMCritic, MLLMReading
from img_core.mllm.quantization import (
    QUANTIZATIONS,
    UNQUANTIZED_MODULES,
    default_dtype,
    default_quantization,
    quantization_config,
    tensor_bytes,
)
from img_core.mllm.specs import (
    CHAT_TEMPLATES,
    CONVERSION_RECORD,
    DEFAULT_CACHE_DIR,
    FAMILIES,
    IMAGE_ASPECTS,
    KNOWN_MLLMS,
    MLLMSpec,
    read_conversion_record,
    resolve_spec,
    spec_from_folder,
)
from img_core.settings import MLLM_GUIDANCE_MODES

__all__ = [
    "CHAT_TEMPLATES", "LLAVA_IMAGE_TOKEN", "LLAVA_SYSTEM", "LLAVA_V0_ANSWER", "LLAVA_V0_PROMPT", "LLAVA_V1_ANSWER",
    "LLAVA_V1_PROMPT", "CONVERSION_RECORD", "DEFAULT_CACHE_DIR", "FAMILIES", "IMAGE_ASPECTS", "MLLM_GUIDANCE_MODES",
    "KNOWN_MLLMS", "MIN_CRITIQUE_TOKENS", "MLLMCritic", "MLLMReading", "MLLMSpec", "QUANTIZATIONS", "STOP_STRINGS",
    "UNQUANTIZED_MODULES", "default_dtype", "default_quantization", "encode_conversation", "expand_to_square",
    "quantization_config", "read_conversion_record", "resolve_spec", "spec_from_folder", "tensor_bytes",
]
