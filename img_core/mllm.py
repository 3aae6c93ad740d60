"""The MLLM critic: critique text and guidance features for an (image, prompt) pair.

IMG asks a multimodal LLM how an image could match the intended prompt and uses the last-layer hidden
states of that conversation as *guidance features* for the Implicit Aligner (REFERENCE §1, §5):

    guidance = hidden_states[-1] of ONE forward pass over   system text + image tokens + question
                                                                                     (batch 1, no pooling)

Two guidance modes:
  * "question" - exactly what the authors' release computes: the conversation up to the assistant's turn.
  * "dialogue" - this project's extension: the critique (possibly edited by the user) is teacher-forced as
    the assistant's answer after the question, so the features cover question + answer and an edited
    critique changes the guidance. One forward pass over prompt + answer ids, no generation.

Chat templates are an explicit setting of each `MLLMSpec` (the release picks one from the checkpoint
folder name, REFERENCE §5). The LLaVA templates are written out here; they follow `conv_llava_v0` and
`conv_llava_v1` of the original LLaVA code-base (haotian-liu/LLaVA, llava/conversation.py):

    llava-v0: "{system}###Human: <image>\\n{question}###Assistant:"          answer: " {answer}###"
    llava-v1: "{system} USER: <image>\\n{question} ASSISTANT:"               answer: " {answer}</s>"

and the text around `<image>` is tokenized chunk by chunk behind one BOS, as LLaVA's
`tokenizer_image_token` does (so "\\n" after the image is tokenized as at the start of a text). Qwen2.5-VL
uses its processor's own chat template. LLaVA images are padded to a square with the image processor's
mean colour before preprocessing ("pad" aspect mode of LLaVA-1.5).

Quantization (`QUANTIZATIONS`) goes through transformers' `BitsAndBytesConfig` / `QuantoConfig`. Only
the language model's linear layers are quantized: the vision tower, the multimodal projector and
`lm_head` stay in `dtype`. They are a small share of the weights, quantizing them costs the most
quality, and bitsandbytes' 4-bit CPU path cannot pack layers narrower than its 64-wide blocks (the tiny
vision towers are 32 wide).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from img_core.errors import InvalidInputError, OutOfMemoryError, WeightsNotFoundError
from img_core.questions import load_question_templates, pick_question

logger = logging.getLogger(__name__)

FAMILIES = ("llava", "qwen2_5_vl")
CHAT_TEMPLATES = ("llava-v0", "llava-v1", "qwen2.5-vl")
IMAGE_ASPECTS = ("pad", "native")  # pad to square first (LLaVA-1.5) or give the processor the image as is
GUIDANCE_MODES = ("question", "dialogue")
QUANTIZATIONS = ("none", "bnb-nf4", "bnb-8bit", "quanto-int8", "quanto-int4")

# A converted checkpoint folder records how it was converted (chat template, aspect mode) in this file.
CONVERSION_RECORD = "img_studio_mllm.json"
DEFAULT_CACHE_DIR = Path("~/.cache/img-studio")
MIN_CRITIQUE_TOKENS = 4  # EOS is forbidden before this many tokens: no critique is shorter, and
# random-weight test models would otherwise sometimes answer with nothing at all.

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

# Modules kept unquantized, per family (module names of the transformers v5 classes).
UNQUANTIZED_MODULES = {
    "llava": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "qwen2_5_vl": ["model.visual", "lm_head"],
}

HUB_FETCH_HINT = (
    "On a machine with internet run `huggingface-cli download {model_id}` and copy the Hugging Face cache "
    "(~/.cache/huggingface/hub) to this machine, or pass the downloaded folder as the model id."
)


@dataclass(frozen=True)
class MLLMSpec:
    """Which MLLM to load and how to talk to it. Recorded with every guidance configuration."""

    name: str
    model_id: str  # hub id or local folder (transformers format)
    family: str  # "llava" | "qwen2_5_vl"
    chat_template: str  # "llava-v0" | "llava-v1" | "qwen2.5-vl"
    hidden_size: int  # Dg, width of the guidance features (metadata; checked against the loaded config)
    image_aspect: str = "pad"  # "pad" | "native"
    tiny: bool = False  # a tiny test model: model_id is a folder name under the tiny models root
    context_length: int | None = None  # None: the language model's max_position_embeddings
    fetch_hint: str = ""  # how to get the weights, shown when they are missing

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InvalidInputError(f"MLLM family must be one of {FAMILIES}, got {self.family!r}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise InvalidInputError(f"chat_template must be one of {CHAT_TEMPLATES}, got {self.chat_template!r}")
        if (self.family == "qwen2_5_vl") != (self.chat_template == "qwen2.5-vl"):
            raise InvalidInputError(f"chat_template {self.chat_template!r} does not fit family {self.family!r}")
        if self.image_aspect not in IMAGE_ASPECTS:
            raise InvalidInputError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {self.image_aspect!r}")


KNOWN_MLLMS: dict[str, MLLMSpec] = {
    "img-llava-13b": MLLMSpec(
        name="img-llava-13b",
        model_id=str(DEFAULT_CACHE_DIR / "img-llava-13b-hf"),
        family="llava",
        chat_template="llava-v0",  # the release's folder is named `llava`, which selects conv_llava_v0
        hidden_size=5120,
        fetch_hint=(
            "On a machine with internet download the `llava/` folder of the hub repo shi-labs/IMG "
            "(`huggingface-cli download shi-labs/IMG --include 'llava/*' --local-dir shi-labs-IMG`), copy it "
            "here and convert it: `python -m img_core convert-llava --source shi-labs-IMG/llava "
            "--out ~/.cache/img-studio/img-llava-13b-hf` (needs openai/clip-vit-large-patch14-336 too)."
        ),
    ),
    "llava-1.5-13b": MLLMSpec(
        name="llava-1.5-13b",
        model_id="llava-hf/llava-1.5-13b-hf",
        family="llava",
        chat_template="llava-v1",
        hidden_size=5120,
    ),
    "qwen2.5-vl-7b": MLLMSpec(
        name="qwen2.5-vl-7b",
        model_id="Qwen/Qwen2.5-VL-7B-Instruct",
        family="qwen2_5_vl",
        chat_template="qwen2.5-vl",
        hidden_size=3584,
        image_aspect="native",
    ),
    "tiny-llava": MLLMSpec(
        name="tiny-llava",
        model_id="tiny-llava",
        family="llava",
        chat_template="llava-v0",
        hidden_size=64,
        tiny=True,
        fetch_hint="Build it with `img_core.tiny_mllm.build_tiny_llava(<tiny root>/tiny-llava)`.",
    ),
    "tiny-qwen": MLLMSpec(
        name="tiny-qwen",
        model_id="tiny-qwen",
        family="qwen2_5_vl",
        chat_template="qwen2.5-vl",
        hidden_size=64,
        image_aspect="native",
        tiny=True,
        fetch_hint="Build it with `img_core.tiny_mllm.build_tiny_qwen(<tiny root>/tiny-qwen)`.",
    ),
}


def resolve_spec(name_or_spec: str | MLLMSpec, tiny_root: Path | None = None) -> MLLMSpec:
    """A known name, an `MLLMSpec`, or a local converted folder -> a spec whose model_id can be loaded.

    Tiny specs get their folder under `tiny_root` (`<tiny_root>/tiny-llava`); `~` is expanded."""
    if isinstance(name_or_spec, MLLMSpec):
        spec = name_or_spec
    elif name_or_spec in KNOWN_MLLMS:
        spec = KNOWN_MLLMS[name_or_spec]
    elif Path(name_or_spec).expanduser().is_dir():
        spec = spec_from_folder(name_or_spec)
    else:
        raise InvalidInputError(
            f"unknown MLLM {name_or_spec!r}: use one of {sorted(KNOWN_MLLMS)} or a local model folder"
        )
    if spec.tiny and not Path(spec.model_id).is_absolute():
        if tiny_root is None:
            raise InvalidInputError(f"MLLM {spec.name!r} is a tiny test model: pass the tiny models root")
        return replace(spec, model_id=str(Path(tiny_root) / spec.model_id))
    if _looks_like_path(spec.model_id):
        return replace(spec, model_id=str(Path(spec.model_id).expanduser()))
    return spec


def spec_from_folder(folder: str | Path, name: str | None = None) -> MLLMSpec:
    """Spec for a local transformers-format folder. A folder written by `convert_llava` carries its chat
    template in `img_studio_mllm.json`; otherwise the family comes from config.json and the template
    defaults to llava-v1 / qwen2.5-vl."""
    folder = Path(folder).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"{folder} is not a model folder: {config_path} is missing")
    config = json.loads(config_path.read_text())
    record = read_conversion_record(folder)
    if config.get("model_type") == "llava":
        family, template, hidden = "llava", "llava-v1", config["text_config"]["hidden_size"]
    elif config.get("model_type") == "qwen2_5_vl":
        text_config = config.get("text_config", config)
        family, template, hidden = "qwen2_5_vl", "qwen2.5-vl", text_config["hidden_size"]
    else:
        raise InvalidInputError(f"{folder}: model_type {config.get('model_type')!r} is not a supported MLLM")
    return MLLMSpec(
        name=name or folder.name,
        model_id=str(folder),
        family=family,
        chat_template=record.get("chat_template", template),
        hidden_size=int(hidden),
        image_aspect=record.get("image_aspect", "pad" if family == "llava" else "native"),
    )


def read_conversion_record(folder: str | Path) -> dict:
    """The `img_studio_mllm.json` written by `convert_llava` (empty dict when there is none)."""
    path = Path(folder) / CONVERSION_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def default_quantization(device: str | torch.device) -> str:
    """nf4 on CUDA (LLaVA-13B fits in ~8 GB), none elsewhere."""
    return "bnb-nf4" if torch.device(device).type == "cuda" else "none"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA (the release runs LLaVA in bf16), float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def quantization_config(quantization: str, family: str, compute_dtype: torch.dtype):
    """The transformers quantization config for a `QUANTIZATIONS` name (None for "none")."""
    from transformers import BitsAndBytesConfig, QuantoConfig

    skip = UNQUANTIZED_MODULES[family]
    if quantization == "none":
        return None
    if quantization == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "quanto-int8":
        return QuantoConfig(weights="int8", modules_to_not_convert=skip)
    if quantization == "quanto-int4":
        return QuantoConfig(weights="int4", modules_to_not_convert=skip)
    raise InvalidInputError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically with `fill` (LLaVA-1.5's "pad" aspect mode)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes really held by a (possibly quantized) tensor.

    Tensor subclasses that wrap inner tensors (optimum-quanto's QTensors: int data + scales) are counted
    through their inner tensors; bitsandbytes parameters add their quantization statistics."""
    if hasattr(tensor, "__tensor_flatten__"):  # a wrapper subclass: count what it wraps
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names)
    total = tensor.numel() * tensor.element_size()
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax per block
    while quant_state is not None:
        total += quant_state.absmax.numel() * quant_state.absmax.element_size()
        quant_state = getattr(quant_state, "state2", None)  # nested (double) quantization
    row_scales = getattr(tensor, "SCB", None)  # bitsandbytes 8-bit: one scale per row
    if isinstance(row_scales, torch.Tensor):
        total += row_scales.numel() * row_scales.element_size()
    return total


@contextmanager
def _out_of_memory_as_user_error(spec: MLLMSpec, quantization: str):
    """Turn an accelerator out-of-memory error into `OutOfMemoryError` with what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise OutOfMemoryError(
            f"out of GPU memory running MLLM {spec.name} with quantization {quantization!r}: pick bnb-nf4 or "
            f"quanto-int4, a smaller MLLM, or free the GPU ({str(error).splitlines()[0]})"
        ) from error


def _looks_like_path(model_id: str) -> bool:
    """An existing path, or one that starts with / ~ . or does not have the 'owner/name' form of hub ids."""
    if Path(model_id).expanduser().exists():
        return True
    return model_id.startswith(("/", "~", ".")) or model_id.count("/") != 1


def _missing_weights_error(spec: MLLMSpec, detail: str) -> WeightsNotFoundError:
    hint = spec.fetch_hint or HUB_FETCH_HINT.format(model_id=spec.model_id)
    return WeightsNotFoundError(f"weights of MLLM {spec.name!r} not found at {spec.model_id} ({detail}). {hint}")


class MLLMCritic:
    """A loaded MLLM (model + processor, loaded once) that critiques images and yields guidance."""

    def __init__(self, spec: MLLMSpec, model, processor, quantization: str, device: str, dtype: torch.dtype):
        self.spec = spec
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.quantization = quantization
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden_size = int(model.config.text_config.hidden_size)
        self.context_length = spec.context_length or int(model.config.text_config.max_position_embeddings)
        self.templates = load_question_templates()
        if self.hidden_size != spec.hidden_size:
            logger.warning(
                "MLLM %s: hidden size %d differs from the spec's %d; using %d",
                spec.name, self.hidden_size, spec.hidden_size, self.hidden_size,
            )

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        spec: MLLMSpec | str,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
    ) -> "MLLMCritic":
        """Load model and processor with `from_pretrained` (tiny folders and hub ids alike).

        `spec` is an `MLLMSpec` (tiny ones resolved with `resolve_spec`), a known name or a local folder.
        dtype defaults to bfloat16 on CUDA and float32 on CPU (float16 with bnb-8bit); quantization to
        `default_quantization(device)`."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

        if isinstance(spec, str):
            spec = resolve_spec(spec)
        quantization = quantization or default_quantization(device)
        if quantization not in QUANTIZATIONS:
            raise InvalidInputError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        # bitsandbytes' int8 matmul works in float16 and casts (and logs a warning) on every call otherwise.
        dtype = dtype or (torch.float16 if quantization == "bnb-8bit" else default_dtype(device))
        if spec.tiny and not Path(spec.model_id).is_absolute():
            raise InvalidInputError(f"tiny MLLM spec {spec.name!r} has no folder: pass it through resolve_spec")
        if _looks_like_path(spec.model_id):
            folder = Path(spec.model_id).expanduser()
            if not (folder / "config.json").is_file():
                detail = "no config.json in it" if folder.exists() else "no such model folder"
                raise _missing_weights_error(spec, detail)
            spec = replace(spec, model_id=str(folder))
            recorded = read_conversion_record(folder).get("chat_template")
            if recorded and recorded != spec.chat_template:
                logger.warning(
                    "MLLM %s: folder %s was converted for chat template %s but the spec says %s; using %s",
                    spec.name, folder, recorded, spec.chat_template, spec.chat_template,
                )
        model_classes = {"llava": LlavaForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
        model_class = model_classes[spec.family]
        try:
            with _out_of_memory_as_user_error(spec, quantization):
                processor = AutoProcessor.from_pretrained(spec.model_id)
                model = model_class.from_pretrained(
                    spec.model_id,
                    dtype=dtype,
                    quantization_config=quantization_config(quantization, spec.family, dtype),
                    device_map={"": str(device)},
                )
        except ImportError as error:
            raise InvalidInputError(f"quantization {quantization!r} needs a missing package: {error}") from error
        except OSError as error:  # offline and not cached, or files missing from the folder
            raise _missing_weights_error(spec, str(error).splitlines()[0]) from error
        model.eval()
        logger.info("loaded MLLM %s (%s, %s, quantization %s)", spec.name, spec.model_id, dtype, quantization)
        return cls(spec, model, processor, quantization, str(device), dtype)

    def memory_bytes(self) -> int:
        """Bytes held by the weights and buffers, counting quantized tensors by what they really store."""
        tensors = {id(t): t for t in self.model.parameters()}
        tensors.update({id(t): t for t in self.model.buffers()})
        return sum(tensor_bytes(t) for t in tensors.values())

    # --------------------------------------------------------------------------------------- public API

    def question_for(self, prompt: str, seed: int) -> str:
        """The question asked about `prompt` for this seed (one of the 100 templates)."""
        return pick_question(prompt, seed, self.templates)

    @torch.no_grad()  # not inference_mode: quanto int4 tensors fail under it
    def critique(self, image: Image.Image, prompt: str, max_new_tokens: int = 96, seed: int = 0) -> str:
        """The MLLM's greedy answer (at most `max_new_tokens` tokens) to how `image` could match `prompt`."""
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        inputs = self.conversation_inputs(image, prompt, seed, answer=None, reserve=max_new_tokens)
        input_length = inputs["input_ids"].shape[1]
        stop_string = STOP_STRINGS.get(self.spec.chat_template)
        stopping = {"stop_strings": [stop_string], "tokenizer": self.tokenizer} if stop_string else {}
        with _out_of_memory_as_user_error(self.spec, self.quantization):
            output_ids = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min(MIN_CRITIQUE_TOKENS, max_new_tokens),
                **stopping,
            )
        text = self.tokenizer.decode(output_ids[0, input_length:], skip_special_tokens=True)
        if stop_string:
            text = text.split(stop_string)[0]
        return text.strip()

    @torch.no_grad()  # not inference_mode: quanto int4 tensors fail under it
    def guidance(
        self,
        image: Image.Image,
        prompt: str,
        critique: str | None = None,
        mode: str = "question",
        seed: int = 0,
    ) -> torch.Tensor:
        """Guidance features (1, Sg, Dg), float32 on CPU: `hidden_states[-1]` of one forward pass.

        mode "question": the conversation up to the assistant's turn (critique ignored), as released.
        mode "dialogue": the critique is teacher-forced as the assistant's answer after the question."""
        if mode not in GUIDANCE_MODES:
            raise InvalidInputError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
        if mode == "dialogue" and not (critique and critique.strip()):
            raise InvalidInputError("dialogue guidance needs a critique: generate one with critique() or type one")
        answer = critique.strip() if mode == "dialogue" else None
        inputs = self.conversation_inputs(image, prompt, seed, answer=answer, reserve=0)
        with _out_of_memory_as_user_error(self.spec, self.quantization):
            outputs = self.model(**inputs, output_hidden_states=True, use_cache=False)
        return outputs.hidden_states[-1].float().cpu()  # (1, Sg, Dg)

    # ------------------------------------------------------------------------------- building the inputs

    def conversation_inputs(
        self, image: Image.Image, prompt: str, seed: int, answer: str | None, reserve: int
    ) -> dict[str, torch.Tensor]:
        """Model inputs for the conversation, with the prompt (then the answer) cut from their ends when the
        conversation plus `reserve` new tokens would not fit the context."""
        if not isinstance(image, Image.Image):
            raise InvalidInputError(f"image must be a PIL image, got {type(image).__name__}")
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        image = image.convert("RGB")
        texts = {"prompt": prompt, "answer": answer}
        image_token = self.processor.image_token
        for field, text in texts.items():
            if text and image_token in text:
                raise InvalidInputError(f"the {field} must not contain the image token {image_token}")
        limit = self.context_length - reserve
        cut = {"prompt": 0, "answer": 0}
        while True:
            inputs = self._encode(image, self.question_for(texts["prompt"], seed), texts["answer"])
            excess = inputs["input_ids"].shape[1] - limit
            if excess <= 0:
                break
            field = "prompt" if self._token_count(texts["prompt"]) > 0 else "answer"
            if texts[field] is None or self._token_count(texts[field]) == 0:
                raise InvalidInputError(
                    f"the image and question alone take {inputs['input_ids'].shape[1]} tokens, more than the "
                    f"{limit} that fit {self.spec.name}'s context"
                )
            texts[field], removed = self._cut_tokens(texts[field], excess)
            cut[field] += removed
        for field, removed in cut.items():
            if removed:
                logger.warning(
                    "%s too long for %s's context of %d tokens: cut %d tokens from its end",
                    field, self.spec.name, self.context_length, removed,
                )
        return {name: value.to(self.device) for name, value in inputs.items()}

    def _token_count(self, text: str | None) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False, verbose=False)) if text else 0

    def _cut_tokens(self, text: str, count: int) -> tuple[str, int]:
        """Drop the last `count` tokens of `text` (at least one); returns the new text and how many went."""
        ids = self.tokenizer.encode(text, add_special_tokens=False, verbose=False)
        count = min(max(count, 1), len(ids))
        return self.tokenizer.decode(ids[: len(ids) - count]), count

    def _encode(self, image: Image.Image, question: str, answer: str | None) -> dict[str, torch.Tensor]:
        if self.spec.family == "llava":
            return self._encode_llava(image, question, answer)
        return self._encode_qwen(image, question, answer)

    def _encode_llava(self, image: Image.Image, question: str, answer: str | None) -> dict[str, torch.Tensor]:
        image_processor = self.processor.image_processor
        if self.spec.image_aspect == "pad":
            image = expand_to_square(image, tuple(int(255 * mean) for mean in image_processor.image_mean))
        # The processor expands one image token to as many as the vision tower yields for this image.
        encoded = self.processor(text=self.processor.image_token, images=image, return_tensors="pt")
        num_image_tokens = int((encoded["input_ids"] == self.processor.image_token_id).sum())

        if self.spec.chat_template == "llava-v0":
            template, answer_template = LLAVA_V0_PROMPT, LLAVA_V0_ANSWER
        else:
            template, answer_template = LLAVA_V1_PROMPT, LLAVA_V1_ANSWER
        text = template.replace("{question}", question)
        if answer is not None:
            text += answer_template.replace("{answer}", answer)
        before_image, after_image = text.split(LLAVA_IMAGE_TOKEN)
        input_ids = (
            [self.tokenizer.bos_token_id]
            + self.tokenizer.encode(before_image, add_special_tokens=False)
            + [self.processor.image_token_id] * num_image_tokens
            + self.tokenizer.encode(after_image, add_special_tokens=False)
        )
        input_ids = torch.tensor([input_ids])  # (1, S)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": encoded["pixel_values"].to(self.dtype),  # (1, 3, H, W)
        }

    def _encode_qwen(self, image: Image.Image, question: str, answer: str | None) -> dict[str, torch.Tensor]:
        if self.spec.image_aspect == "pad":
            mean = self.processor.image_processor.image_mean
            image = expand_to_square(image, tuple(int(255 * m) for m in mean))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)
        encoded = self.processor(text=[text], images=[image], return_tensors="pt")
        encoded["pixel_values"] = encoded["pixel_values"].to(self.dtype)
        return dict(encoded)
