"""The MLLM critic: critique text and guidance features for an (image, prompt) pair.

IMG asks a multimodal LLM how an image could match the intended prompt and uses the last-layer hidden
states of that conversation as *guidance features* for the Implicit Aligner (REFERENCE §1, §5):

    guidance = hidden_states[-1] of ONE forward pass over   system text + image tokens + question
                                                                                     (batch 1, no pooling)

Two guidance modes:
  * "question" - exactly what the authors' release computes: the conversation up to the assistant's turn.
    When a critique is wanted too, ONE prefill gives both: the guidance is the final norm's output over the
    prompt (captured from the first forward of `generate`), and the critique is decoded from its cache.
  * "dialogue" - this project's extension: the critique (possibly edited by the user) is teacher-forced as
    the assistant's answer after the question, so the features cover question + answer and an edited
    critique changes the guidance. One forward pass over prompt + answer ids, no generation.

The question comes from a `QuestionSource` (img_core.questions: ours, the release's, or a file), drawn by
the seed, or is passed explicitly; `read` returns the question actually asked (cut to fit the context when
the prompt is too long).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from img_core.clip_processing import pil_clip_image_processor
from img_core.errors import InvalidInputError, OutOfMemoryError
from img_core.mllm.chat import STOP_STRINGS, encode_conversation
from img_core.mllm.converted import check_prepared_folder
from img_core.mllm.quantization import (
    QUANTIZATIONS,
    default_dtype,
    default_quantization,
    quantization_config,
    tensor_bytes,
)
from img_core.mllm.specs import (
    MLLMSpec,
    looks_like_path,
    missing_weights_error,
    read_conversion_record,
    resolve_spec,
)
from img_core.questions import QuestionSource, ours_question_source
from img_core.settings import DEFAULT_MAX_CRITIQUE_TOKENS, MLLM_GUIDANCE_MODES

logger = logging.getLogger(__name__)

MIN_CRITIQUE_TOKENS = 4  # EOS is forbidden before this many tokens: no critique is shorter, and
# random-weight test models would otherwise sometimes answer with nothing at all.
TextCallback = Callable[[str], None]  # the critique so far, as it streams


@dataclass
class MLLMReading:
    """What one look of the MLLM at an image gives: the question asked, the critique and/or the guidance."""

    question: str
    critique: str | None = None
    guidance: torch.Tensor | None = None  # (1, Sg, Dg) float32 on CPU


class MLLMCritic:
    """A loaded MLLM (model + processor, loaded once) that critiques images and yields guidance."""

    def __init__(
        self,
        spec: MLLMSpec,
        model,
        processor,
        quantization: str,
        device: str,
        dtype: torch.dtype,
        questions: QuestionSource | None = None,
    ):
        self.spec = spec
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.quantization = quantization
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden_size = int(model.config.text_config.hidden_size)
        self.context_length = spec.context_length or int(model.config.text_config.max_position_embeddings)
        self.questions = questions or ours_question_source()
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
        This loads what is on disk; `img_core.mllm.loading.load_mllm` (what the session, evaluation, the
        scorers, the trainer and the benchmarks call) also prepares the model and sets the question source.
        dtype defaults to bfloat16 on CUDA and float32 on CPU (float16 with bnb-8bit); quantization to
        `default_quantization(device)`."""
        from transformers import (
            AutoProcessor,
            LlavaForConditionalGeneration,
            Qwen2_5_VLForConditionalGeneration,
        )


        if isinstance(spec, str) or spec.in_cache:  # a cached folder is found under the cache root as it is now
            spec = resolve_spec(spec)
        quantization = quantization or default_quantization(device)
        if quantization not in QUANTIZATIONS:
            raise InvalidInputError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        # bitsandbytes' int8 matmul works in float16 and casts (and logs a warning) on every call otherwise.
        dtype = dtype or (torch.float16 if quantization == "bnb-8bit" else default_dtype(device))
        if spec.tiny and not Path(spec.model_id).is_absolute():
            raise InvalidInputError(f"tiny MLLM spec {spec.name!r} has no folder: pass it through resolve_spec")
        if looks_like_path(spec.model_id):
            folder = Path(spec.model_id).expanduser()
            if not (folder / "config.json").is_file():
                detail = "no config.json in it" if folder.exists() else "no such model folder"
                raise missing_weights_error(spec, detail)
            spec = replace(spec, model_id=str(folder))
            check_prepared_folder(folder)  # a half-converted folder never loads
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
                # PIL resizing as the release's transformers 4.37 did (LLaVA's CLIP input; Qwen's is left as is).
                processor.image_processor = pil_clip_image_processor(processor.image_processor)
                model = model_class.from_pretrained(
                    spec.model_id,
                    dtype=dtype,
                    quantization_config=quantization_config(quantization, spec.family, dtype),
                    device_map={"": str(device)},
                )
        except ImportError as error:
            raise InvalidInputError(f"quantization {quantization!r} needs a missing package: {error}") from error
        except OSError as error:  # offline and not cached, or files missing from the folder
            raise missing_weights_error(spec, str(error).splitlines()[0]) from error
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
        """The question asked about `prompt` for this seed (drawn from `self.questions`)."""
        return self.questions.pick(prompt, seed)

    @torch.no_grad()  # not inference_mode: quanto int4 tensors fail under it
    def read(
        self,
        image: Image.Image,
        prompt: str,
        *,
        seed: int = 0,
        question: str | None = None,
        mode: str = "question",
        critique: str | None = None,
        write_critique: bool = True,
        max_new_tokens: int = DEFAULT_MAX_CRITIQUE_TOKENS,
        on_text: TextCallback | None = None,
    ) -> MLLMReading:
        """Everything a round needs from the MLLM, computing each thing once.

        mode "question": guidance over image + question; with `write_critique` the critique is generated from
        the same prefill (the vision tower and the prompt run once). mode "dialogue": `critique` (or, when it
        is None, one the MLLM writes first) is teacher-forced after the question and the guidance covers both.
        `question` overrides the seeded draw from `self.questions`."""
        if mode not in MLLM_GUIDANCE_MODES:
            raise InvalidInputError(f"guidance mode must be one of {MLLM_GUIDANCE_MODES}, got {mode!r}")
        critique = critique.strip() if critique and critique.strip() else None
        if mode == "question":
            if not write_critique:
                inputs, asked = self._fitted_inputs(image, prompt, seed, question, answer=None, reserve=0)
                return MLLMReading(asked, None, self._forward_guidance(inputs))
            inputs, asked = self._fitted_inputs(image, prompt, seed, question, answer=None, reserve=max_new_tokens)
            text, guidance = self._generate(inputs, max_new_tokens, on_text, capture_guidance=True)
            return MLLMReading(asked, text, guidance)
        if critique is None:
            inputs, asked = self._fitted_inputs(image, prompt, seed, question, answer=None, reserve=max_new_tokens)
            critique, _ = self._generate(inputs, max_new_tokens, on_text, capture_guidance=False)
            question = asked
        inputs, asked = self._fitted_inputs(image, prompt, seed, question, answer=critique, reserve=0)
        return MLLMReading(asked, critique, self._forward_guidance(inputs))

    def critique(
        self,
        image: Image.Image,
        prompt: str,
        max_new_tokens: int = DEFAULT_MAX_CRITIQUE_TOKENS,
        seed: int = 0,
        question: str | None = None,
        on_text: TextCallback | None = None,
    ) -> str:
        """The MLLM's greedy answer (at most `max_new_tokens` tokens) to how `image` could match `prompt`."""
        inputs, _ = self._fitted_inputs(image, prompt, seed, question, answer=None, reserve=max_new_tokens)
        text, _ = self._generate(inputs, max_new_tokens, on_text, capture_guidance=False)
        return text

    def guidance(
        self,
        image: Image.Image,
        prompt: str,
        critique: str | None = None,
        mode: str = "question",
        seed: int = 0,
        question: str | None = None,
    ) -> torch.Tensor:
        """Guidance features (1, Sg, Dg), float32 on CPU: `hidden_states[-1]` of one forward pass.

        mode "question": the conversation up to the assistant's turn (critique ignored), as released.
        mode "dialogue": the critique is teacher-forced as the assistant's answer after the question."""
        if mode not in MLLM_GUIDANCE_MODES:
            raise InvalidInputError(f"guidance mode must be one of {MLLM_GUIDANCE_MODES}, got {mode!r}")
        if mode == "dialogue" and not (critique and critique.strip()):
            raise InvalidInputError("dialogue guidance needs a critique: generate one with critique() or type one")
        answer = critique.strip() if mode == "dialogue" else None
        inputs, _ = self._fitted_inputs(image, prompt, seed, question, answer=answer, reserve=0)
        return self._forward_guidance(inputs)

    def conversation_inputs(
        self,
        image: Image.Image,
        prompt: str,
        seed: int,
        answer: str | None,
        reserve: int,
        question: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs (on the model's device) for the conversation, fitted to the context."""
        return self._fitted_inputs(image, prompt, seed, question, answer, reserve)[0]

    def encode_conversation(self, image: Image.Image, question: str, answer: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs (on the model's device) for `image` + this exact `question` (+ `answer`), not fitted."""
        inputs = encode_conversation(self.processor, self.spec, self.dtype, image.convert("RGB"), question, answer)
        return {name: value.to(self.device) for name, value in inputs.items()}

    # ------------------------------------------------------------------------------------ running the model

    def _forward_guidance(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with _out_of_memory_as_user_error(self.spec, self.quantization):
            outputs = self.model(**inputs, output_hidden_states=True, use_cache=False)
        return outputs.hidden_states[-1].float().cpu()  # (1, Sg, Dg)

    def _final_norm(self) -> torch.nn.Module:
        """The language model's last norm: its output over the prompt is `hidden_states[-1]`."""
        return self.model.model.language_model.norm

    def _generate(
        self,
        inputs: dict[str, torch.Tensor],
        max_new_tokens: int,
        on_text: TextCallback | None,
        capture_guidance: bool,
    ) -> tuple[str, torch.Tensor | None]:
        """Greedy critique from `inputs`; with `capture_guidance`, also the final norm's output of the prefill."""
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_length = inputs["input_ids"].shape[1]
        stop_string = STOP_STRINGS.get(self.spec.chat_template)
        stopping = {"stop_strings": [stop_string], "tokenizer": self.tokenizer} if stop_string else {}
        streamer = _CritiqueStreamer(self.tokenizer, stop_string, on_text) if on_text else None
        captured: list[torch.Tensor] = []

        def keep_prefill(module, args, output) -> None:
            if not captured:  # the first call is the prefill over the whole prompt: (1, S, Dg)
                captured.append(output.float().cpu())

        hook = self._final_norm().register_forward_hook(keep_prefill) if capture_guidance else None
        try:
            with _out_of_memory_as_user_error(self.spec, self.quantization):
                output_ids = self.model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min(MIN_CRITIQUE_TOKENS, max_new_tokens),
                    streamer=streamer,
                    **stopping,
                )
        finally:
            if hook is not None:
                hook.remove()
        text = self.tokenizer.decode(output_ids[0, input_length:], skip_special_tokens=True)
        if stop_string:
            text = text.split(stop_string)[0]
        guidance = captured[0] if captured else None
        if capture_guidance and (guidance is None or guidance.shape[1] != input_length):
            raise RuntimeError(f"{self.spec.name}: the prefill's hidden states were not captured")
        return text.strip(), guidance

    # ------------------------------------------------------------------------------- building the inputs

    def _fitted_inputs(
        self,
        image: Image.Image,
        prompt: str,
        seed: int,
        question: str | None,
        answer: str | None,
        reserve: int,
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Model inputs and the question asked. When the conversation plus `reserve` new tokens would not fit
        the context, the prompt inside the question (an explicit question: its end), then the answer, is cut
        from its end."""
        if not isinstance(image, Image.Image):
            raise InvalidInputError(f"image must be a PIL image, got {type(image).__name__}")
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        image = image.convert("RGB")
        # The text that is cut when too long: the prompt (the question is drawn around it) or the question.
        texts = {"prompt": prompt if question is None else question, "answer": answer}
        image_token = self.processor.image_token
        for field, text in texts.items():
            if text and image_token in text:
                raise InvalidInputError(f"the {field} must not contain the image token {image_token}")
        limit = self.context_length - reserve
        cut = {"prompt": 0, "answer": 0}
        while True:
            asked = self.question_for(texts["prompt"], seed) if question is None else texts["prompt"]
            inputs = encode_conversation(self.processor, self.spec, self.dtype, image, asked, texts["answer"])
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
        return {name: value.to(self.device) for name, value in inputs.items()}, asked

    def _token_count(self, text: str | None) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False, verbose=False)) if text else 0

    def _cut_tokens(self, text: str, count: int) -> tuple[str, int]:
        """Drop the last `count` tokens of `text` (at least one); returns the new text and how many went."""
        ids = self.tokenizer.encode(text, add_special_tokens=False, verbose=False)
        count = min(max(count, 1), len(ids))
        return self.tokenizer.decode(ids[: len(ids) - count]), count


class _CritiqueStreamer(BaseStreamer):
    """Passes the critique decoded so far to `on_text` after each new token (the prompt is skipped)."""

    def __init__(self, tokenizer, stop_string: str | None, on_text: TextCallback):
        self.tokenizer = tokenizer
        self.stop_string = stop_string
        self.on_text = on_text
        self.generated: list[int] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first puts the prompt ids
            self.seen_prompt = True
            return
        self.generated.extend(int(token) for token in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if self.stop_string:
            text = text.split(self.stop_string)[0]
        self.on_text(text.strip())

    def end(self) -> None:
        pass


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
