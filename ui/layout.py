"""The Gradio Blocks of IMG Studio: widgets, their events, and the stateless API endpoints.

Page: the prompt and Generate on the left; on the right one status area, the current base image, the
editable critique and what the next round will use, and the round buttons; below, every round as a
card in one horizontal strip (`@gr.render` of the tab's `StudioState`).

Every model event is a chain that can never lock the page: an instant step disables the buttons (Stop
stays usable), the job runs through the GPU queue as a generator that catches every error (a user
mistake becomes a warning and one log line; a real failure keeps its traceback in the log) and always
ends by re-enabling the buttons, and `.then`/`.failure` re-enable them again even if Gradio itself fails
before the handler runs. During a job the outputs keep their last value; the status area shows the
stage and the critique streams into its box (`ui.handlers.run_in_worker`). Models prepare in a
background thread (`ui.handlers.ModelPreparation`) while the page already shows; a timer polls it.

Inputs are passed as a set, so a handler receives a dict keyed by component. Events that run models
share one concurrency group of size 1: one GPU job at a time. Each browser tab keeps its rounds in its
own `gr.State`.
"""

import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator

import gradio as gr

from img_core.errors import IMGError
from img_core.evaluation.scorers import VQA_SCORER
from img_core.presets import PRESETS
from img_core.session import IMGSession, StageCallback, StageEvent
from img_core.settings import (
    DEFAULT_AUTO_ROUNDS,
    GUIDANCE_MODES,
    LIMITS,
    MLLM_QUANTIZATIONS,
    check_prompt,
)
from ui import views
from ui.examples import EXAMPLES
from ui.gpu import on_zero_gpu
from ui.handlers import (
    PREPARATION_STEPS,
    ModelPreparation,
    Produced,
    StopRequested,
    Studio,
    run_in_worker,
    user_errors,
)
from ui.history import HistoryStore
from ui.history_panel import HISTORY_CSS, HistoryPanel
from ui.image_files import png_file
from ui.models import ModelHost, compatible_mllms
from ui.state import RoundRequest, StudioState

logger = logging.getLogger(__name__)

GPU_QUEUE = "gpu"  # concurrency id shared by every event that runs a model
MAX_UPLOAD = "25mb"  # larger uploads are refused before they reach the models
PREPARATION_POLL_SECONDS = 1.0  # how often the page asks how the model preparation goes
CARD_IMAGE_PX = 256  # height of a round card's image

CSS = """
#tiny-banner { border: 2px solid #d97706; border-radius: 8px; padding: 4px 12px; background: #fffbeb; }
#tiny-banner * { color: #78350f !important; }
.img-studio-tiny img { image-rendering: pixelated; }
#current-image img { width: 100%; height: 100%; object-fit: contain; }
#round-strip { flex-wrap: nowrap !important; overflow-x: auto; align-items: stretch; padding-bottom: 8px; }
#round-strip > .round-card { flex: 0 0 300px !important; min-width: 300px !important; max-width: 300px; }
#round-strip > .round-card.is-base { outline: 3px solid var(--color-accent); outline-offset: -3px; }
.round-card img { image-rendering: pixelated; object-fit: contain; }
.round-card .prose { overflow-wrap: anywhere; }
"""

INTRO = """# IMG Studio
Generate an image, let a multimodal LLM critique how it misses the prompt, and re-generate it with
**Implicit Multimodal Guidance** (IMG, ICCV 2025): the critique's hidden states re-align the image's
IP-Adapter features, and the same model re-draws the image from the same prompt and seed.
[Paper (arXiv 2509.26231)](https://arxiv.org/abs/2509.26231) ·
[Authors' code](https://github.com/SHI-Labs/IMG-Multimodal-Diffusion-Alignment) ·
[Weights](https://huggingface.co/shi-labs/IMG)

**How to use:** 1. write a prompt and click **Generate**. 2. click **Refine** (or **Critique** first to read
and edit the MLLM's analysis; **Auto-refine** runs several rounds). 3. compare the rounds in the strip below,
**Refine from here** on any of them, and **Download** every round with its settings."""

SPACES_NOTE = """On a shared Hugging Face Space every visitor waits in one queue. For your own GPU and no
queue, **duplicate this Space** (⋮ menu → *Duplicate this Space*) and choose GPU hardware; docs/SPACES.md
says which preset fits which GPU."""


class StudioUI:
    """Builds the page for one `ModelHost`; `self.demo` is the gr.Blocks."""

    def __init__(
        self,
        host: ModelHost,
        allow_model_switch: bool = False,
        scorer: str | None = VQA_SCORER,
        prepare_models: bool = True,
        history: HistoryStore | None = None,
    ):
        self.host = host
        self.studio = Studio(host, scorer=scorer)
        self.preparation = ModelPreparation(host)
        self.allow_model_switch = allow_model_switch
        # Cheap events that change the tab's rounds: queued (Gradio reports state changes, which re-render
        # the strip, only for queued events) but outside the GPU group, so they never wait for a job.
        self.state_change = {"concurrency_limit": None, "api_visibility": "private", "show_progress": "hidden"}
        self._stops: dict[str, threading.Event] = {}  # Stop flag of each browser tab's running job
        preparing = not host.is_loaded and prepare_models
        classes = ["img-studio-tiny"] if host.preset.is_tiny else []
        with gr.Blocks(title="IMG Studio", delete_cache=(3600, 3600)) as self.demo:
            self.state = gr.State(StudioState())
            self.history = HistoryPanel(self, history)  # the browser's id and its sessions (ui.history_panel)
            gr.Markdown(INTRO)
            self.banner = gr.Markdown(
                views.TINY_BANNER.format(preset=host.preset.name), visible=host.preset.is_tiny, elem_id="tiny-banner"
            )
            self.timer = gr.Timer(PREPARATION_POLL_SECONDS, active=preparing)
            # On a phone the columns stack: only closed accordions lie between Generate and the result.
            with gr.Row(elem_classes=classes):
                with gr.Column(scale=2, min_width=320):
                    self._inputs(preparing)
                    self._settings()
                with gr.Column(scale=3, min_width=360):
                    self._base_panel(preparing)
            self._round_strip()
            self.history.build()
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    gr.Examples(
                        examples=[list(example) for example in EXAMPLES],
                        inputs=[self.prompt, self.seed],
                        cache_examples=False,
                    )
                with gr.Column(scale=3, min_width=360):
                    self._models_panel(preparing)
                    gr.Markdown(SPACES_NOTE)
            self._api_endpoints()
            self._events()
            self.history.wire()
        if prepare_models:
            self.preparation.start()

    # --- layout -----------------------------------------------------------------------------------

    def _button(self, name: str, preparing: bool, **kwargs) -> gr.Button:
        can_run = views.button_states(StudioState(), busy=False, preparing=preparing)[name]
        label = views.button_label(name, f"0/{PREPARATION_STEPS}" if preparing else None)
        button = gr.Button(label, interactive=can_run, elem_id=f"{name.replace('_', '-')}-btn", **kwargs)
        self.buttons[name] = button
        return button

    def _inputs(self, preparing: bool) -> None:
        self.buttons: dict[str, gr.Button | gr.DownloadButton] = {}
        self.prompt = gr.Textbox(
            label="Prompt", lines=2, max_lines=6, placeholder="A green banana and a brown horse.", elem_id="prompt"
        )
        with gr.Row():
            self.seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", min_width=120)
            self.randomize = gr.Button("Random seed", size="sm", scale=0)
        self._button("generate", preparing, variant="primary")
        with gr.Accordion("Start from your own image", open=False):
            self.upload = gr.File(
                label="Your image (PNG, JPEG, WebP; up to " + MAX_UPLOAD.replace("mb", " MB") + ")",
                file_types=["image"],
                type="filepath",
                elem_id="upload-image",
            )
            self._button("use_upload", preparing)

    def _base_panel(self, preparing: bool) -> None:
        self.status = gr.Markdown(self._status_text(None, preparing), elem_id="status")
        self.current = gr.Image(
            label="Base of the next round", type="pil", format="png", interactive=False, height=384,
            elem_id="current-image",
        )  # fmt: skip
        self.critique = gr.Textbox(
            label="Critique (editable)",
            lines=4,
            placeholder="Click Critique for the MLLM's analysis of the base image, then edit it if you like.",
            elem_id="critique",
        )
        self.next_use = gr.Markdown(views.next_round_note(StudioState(), "question", None, None), elem_id="next-use")
        with gr.Row():
            self._button("critique", preparing, variant="secondary")
            self._button("refine", preparing, variant="primary")
        with gr.Row():
            self._button("auto_refine", preparing, variant="secondary")
            self._button("stop", preparing, variant="stop")
        with gr.Row():
            self.auto_rounds = setting_slider("auto_rounds", DEFAULT_AUTO_ROUNDS)
            self.stop_when_flat = gr.Checkbox(
                value=True,
                label="Stop when the score stops improving",
                visible=self.studio.scorer_name is not None,
                elem_id="stop-rule",
            )
        with gr.Row():
            self.buttons["download"] = gr.DownloadButton(
                views.BUTTON_LABELS["download"], value=None, interactive=False, elem_id="download-btn"
            )
            self._button("reset", preparing, variant="stop", size="sm")

    def _settings(self) -> None:
        preset = self.host.preset
        with gr.Accordion("Advanced settings", open=False):
            self.steps = setting_slider("steps", preset.default_steps)
            self.guidance_scale = setting_slider("guidance_scale", preset.default_guidance_scale)
            self.ip_scale = setting_slider("ip_scale", preset.ip_scale, " (paper: 0.2)")
            self.aligner_passes = setting_slider("aligner_passes", preset.aligner_passes, " (paper: 3)")
            self.guidance_mode = gr.Radio(
                list(GUIDANCE_MODES),
                value="question",
                label="Guidance mode",
                info="question: the paper's guidance (the MLLM's question); "
                "dialogue: the question plus the critique as edited",
                elem_id="guidance-mode",
            )
            self.critique_note = gr.Markdown(views.CRITIQUE_NOTES["question"])

    def _models_panel(self, preparing: bool) -> None:
        preset = self.host.preset
        # The switch replaces the models for every user of the process: only with --allow-model-switch.
        with gr.Accordion("Models", open=False, visible=self.allow_model_switch, elem_id="models-panel"):
            self.preset = gr.Dropdown(list(PRESETS), value=preset.name, label="Preset (diffusion backend + MLLM)")
            self.mllm = gr.Dropdown(
                compatible_mllms(preset.name),
                value=self.host.session.mllm_name,
                label="MLLM (those whose guidance this preset's aligner was trained for)",
            )
            self.quantization = gr.Dropdown(
                list(MLLM_QUANTIZATIONS), value=self.host.quantization, label="MLLM quantization"
            )
            self._button("switch", preparing)
            gr.Markdown("\n".join(f"- `{p.name}`: {p.description}" for p in PRESETS.values()))

    def _round_strip(self) -> None:
        """Every round as a card, original first, in one horizontal scrolling row."""
        scorer = self.studio.scorer_name

        @gr.render(inputs=self.state, show_progress="hidden")
        def strip(state: StudioState):
            if state.is_empty:
                gr.Markdown("*No rounds yet. Generate an image, or start from your own.*", elem_id="round-strip")
                return
            with gr.Row(elem_id="round-strip", equal_height=False):
                for index, item in enumerate(state.rounds):
                    classes = ["round-card", "is-base"] if index == state.base else ["round-card"]
                    with gr.Column(variant="panel", elem_classes=classes, elem_id=f"round-card-{index}", min_width=280):
                        gr.Image(
                            png_file(item.image), type="filepath", interactive=False, show_label=False,
                            height=CARD_IMAGE_PX, buttons=["fullscreen", "download"], elem_id=f"round-image-{index}",
                        )  # fmt: skip
                        gr.Markdown(views.card_markdown(state, index, scorer), elem_classes="round-caption")
                        critique = views.card_critique(state, index)
                        if critique is not None:
                            with gr.Accordion(critique[0], open=False):
                                gr.Markdown(critique[1])
                        rebase = gr.Button(
                            "Refine from here",
                            size="sm",
                            interactive=index != state.base,
                            elem_id=f"refine-from-{index}",
                        )
                        rebase.click(
                            lambda *values, chosen=index: self._rebased(chosen, *values),
                            [self.state, self.guidance_mode, self.prompt, self.seed],
                            [self.state, self.current, self.critique, self.next_use],
                            **self.state_change,
                        ).then(self.history.remember_base, [self.history.browser, self.state], None, queue=False)

    def _api_endpoints(self) -> None:
        """Stateless endpoints for gradio_client: /generate, /critique, /refine (hidden widgets)."""
        with gr.Group(visible=False):
            prompt = gr.Textbox(label="prompt")
            seed = gr.Number(label="seed")
            image = gr.File(label="image")
            critique = gr.Textbox(label="critique")
            image_out = gr.Image(label="image", type="pil", format="png")
            text_out = gr.Textbox(label="critique")
            trigger = gr.Button()
        # preprocess=False: the handlers get the values as sent and check them (no rounding of 1.5, no "123"
        # from 123); an upload arrives as Gradio's checked file record (ui.api_inputs says why).
        api = {"concurrency_id": GPU_QUEUE, "concurrency_limit": 1, "preprocess": False}
        trigger.click(self.studio.api_generate, [prompt, seed], image_out, api_name="generate", **api)
        trigger.click(self.studio.api_critique, [image, prompt], text_out, api_name="critique", **api)
        trigger.click(self.studio.api_refine, [image, prompt, critique, seed], image_out, api_name="refine", **api)

    # --- events -----------------------------------------------------------------------------------

    def _events(self) -> None:
        buttons = list(self.buttons.values())
        self.job_outputs = [
            self.current, self.status, self.state, self.critique, self.next_use, *buttons, self.timer,
        ]  # fmt: skip  (the base image first: `scroll_to_output` brings it into view on a phone)
        request_inputs = {
            self.state, self.prompt, self.seed, self.steps, self.guidance_scale, self.ip_scale,
            self.aligner_passes, self.guidance_mode, self.critique, self.auto_rounds, self.upload,
            self.stop_when_flat, self.history.browser,
        }  # fmt: skip
        instant = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        job = {
            "concurrency_id": GPU_QUEUE,
            "concurrency_limit": 1,
            "show_progress": "minimal",
            "show_progress_on": [self.status],  # outputs keep their last value during a job
        }

        def chain(trigger, fn, inputs, api_name=None, **kwargs):
            """Disable the buttons, run `fn` through the GPU queue, re-enable what can run next, whatever
            happened (`.then` runs after success, `.failure` after an error Gradio raised itself)."""
            visibility = {"api_visibility": "undocumented"} if api_name else {"api_visibility": "private"}
            running = trigger(self._lock, self.state, buttons, **instant).then(
                fn, inputs, self.job_outputs, api_name=api_name, **job, **visibility, **kwargs
            )
            running.then(self._unlock, self.state, buttons, **instant)  # the job's own message stays
            running.then(self.history.listing, [self.history.browser, self.history.selected], self.history.list_outputs,
                         **instant)  # fmt: skip
            running.failure(self._unlock_after_failure, self.state, [*buttons, self.status], **instant)
            return running

        chain(self.buttons["generate"].click, self._on_generate, request_inputs, "ui_generate", scroll_to_output=True)
        chain(self.prompt.submit, self._on_generate, request_inputs, scroll_to_output=True)
        chain(self.buttons["use_upload"].click, self._on_use_upload, request_inputs, "ui_use_upload")
        chain(self.buttons["critique"].click, self._on_critique, request_inputs, "ui_critique")
        chain(self.buttons["refine"].click, self._on_refine, request_inputs, "ui_refine")
        chain(self.buttons["auto_refine"].click, self._on_auto_refine, request_inputs, "ui_auto_refine")
        if self.allow_model_switch:
            switch_outputs = [
                self.status, self.banner, self.preset, self.mllm, self.quantization,
                self.steps, self.guidance_scale, self.ip_scale, self.aligner_passes,
            ]  # fmt: skip
            switching = self.buttons["switch"].click(self._lock, self.state, buttons, **instant).then(
                self._on_switch, {self.preset, self.mllm, self.quantization}, switch_outputs,
                concurrency_id=GPU_QUEUE, concurrency_limit=1, api_visibility="private",
            )  # fmt: skip
            switching.then(self._unlock, self.state, buttons, **instant)
            switching.failure(self._unlock_after_failure, self.state, [*buttons, self.status], **instant)
            self.preset.change(self._on_preset_choice, self.preset, self.mllm, **instant)
        self.buttons["stop"].click(self._on_stop, None, None, **instant)  # the job itself says it stops
        self.buttons["reset"].click(self._on_reset, None, self.job_outputs, **self.state_change).then(
            self.history.on_reset, self.history.browser, self.history.list_outputs, **instant
        )  # the old session stays in the History
        self.randomize.click(lambda: random.randint(0, int(LIMITS["seed"].high)), None, self.seed, **instant)
        self.guidance_mode.change(views.CRITIQUE_NOTES.get, self.guidance_mode, self.critique_note, **instant)
        gr.on(  # one listener, "always_last": the note follows the newest values, never a stale reply
            [self.guidance_mode.change, self.critique.input, self.critique.blur, self.prompt.change, self.seed.change],
            self._next_use_note,
            [self.state, self.guidance_mode, self.critique, self.prompt, self.seed],
            self.next_use,
            trigger_mode="always_last",
            **instant,
        )
        self.timer.tick(self._on_tick, self.state, [*buttons, self.status, self.timer], **instant)
        self.demo.load(self._on_page_load, self.state, [*buttons, self.status, self.timer], **instant)
        self.demo.unload(self._on_unload)

    # --- what the page shows ----------------------------------------------------------------------

    def _status_text(self, now: str | None, preparing: bool | None = None) -> str:
        """The one status area: the models (preparing k/n, failed, loaded) and what runs now."""
        preparation = self.preparation
        preparing = preparation.running if preparing is None else preparing
        if preparing and not self.host.is_loaded:
            step = preparation.step_text or f"0/{PREPARATION_STEPS}"
            models = f"**Preparing models ({step})**: {preparation.message or 'starting'}"
        elif preparation.error and not self.host.is_loaded:
            models = (
                f"⚠️ **The models could not be prepared:** {preparation.error}  \n"
                "The app keeps serving: fix the cause, then click Generate to try again."
            )
        else:
            models = self.host.status_line()
        return f"{models}\n\n{now}" if now else models

    def _button_updates(self, state: StudioState, busy: bool) -> dict:
        preparing = self.preparation.running and not self.host.is_loaded
        can_run = views.button_states(state, busy, preparing=preparing)
        can_run["switch"] = can_run["switch"] and self.allow_model_switch
        step = self.preparation.step_text if preparing else None
        updates = {}
        for name, button in self.buttons.items():
            if name == "download":  # its value is the file; the label stays
                updates[button] = gr.update(interactive=can_run[name])
            else:
                updates[button] = gr.update(interactive=can_run[name], value=views.button_label(name, step))
        return updates

    def _state_views(self, state: StudioState, values: dict | None = None, session_id: str = "default") -> dict:
        """The base image, the critique box (emptied: its base changed), the next-round note and the
        download (always every round made so far)."""
        values = values or {}
        mode = values.get(self.guidance_mode, "question")
        updates = {
            self.state: state,
            self.current: gr.update(
                value=None if state.is_empty else png_file(state.base_round().image), label=views.base_label(state)
            ),
            self.critique: gr.update(value="", label=views.critique_label(state)),
            self.next_use: self._next_use_note(state, mode, "", values.get(self.prompt), values.get(self.seed)),
        }
        download = self.buttons["download"]
        if state.is_empty:
            updates[download] = gr.update(value=None, interactive=False)
        else:
            try:
                updates[download] = gr.update(value=str(self.studio.export(state, session_id)), interactive=True)
            except Exception:  # the rounds are still on the page; the next round tries again
                logger.exception("writing the session zip failed")
        return updates

    def _next_use_note(self, state: StudioState, mode: str, critique: str | None, prompt=None, seed=None) -> str:
        question = None
        if mode == "question" and not state.is_empty and self.host.is_loaded:
            try:
                text = check_prompt(prompt).prompt if prompt else state.rounds[0].prompt
                question = self.host.session.critic.question_for(text, int(seed if seed is not None else 0))
            except (IMGError, TypeError, ValueError):
                question = None
        return views.next_round_note(state, mode, question, critique)

    # --- jobs -------------------------------------------------------------------------------------

    def _request(self, values: dict) -> RoundRequest:
        return RoundRequest.from_values(
            prompt=values[self.prompt],
            seed=values[self.seed],
            steps=values[self.steps],
            max_critique_tokens=None,
            guidance_scale=values[self.guidance_scale],
            ip_scale=values[self.ip_scale],
            aligner_passes=values[self.aligner_passes],
            guidance_mode=values[self.guidance_mode],
        )

    def _job(
        self,
        values: dict,
        request: gr.Request,
        action: str,
        produce: Callable[[RoundRequest, StageCallback | None], Iterable],
        auto_rounds: int | None = None,
    ) -> Iterator[dict]:
        """Run `produce` (which yields states, critiques or (state, stop reason) pairs) and show its
        progress; every error ends as a message, and the last update re-enables the buttons."""
        state = values[self.state]
        session_id = getattr(request, "session_hash", None) or "default"
        stop = self._stops.setdefault(session_id, threading.Event())
        stop.clear()
        self.history.busy.add(session_id)  # no History restore or delete in this tab until the job ends
        note = None
        streamed = False  # the critique box shows text of a round that may not finish
        shown_warnings: set[str] = set()

        def warn(messages: Iterable[str]) -> None:
            for message in messages:
                if message not in shown_warnings:
                    shown_warnings.add(message)
                    gr.Warning(message)

        try:
            round_request = self._request(values)
            warn(round_request.warnings)
            auto = (state.next_index, auto_rounds) if auto_rounds else None
            if on_zero_gpu():  # the job runs in a forked worker: no callback crosses; results at the end
                batches = [[Produced(value) for value in produce(round_request, None)]]
            else:
                batches = run_in_worker(lambda on_stage: produce(round_request, on_stage), stop)
            for batch in batches:
                update: dict = {}
                for item in batch:
                    if isinstance(item, StageEvent):
                        if item.stage == "load" and item.message:
                            self.preparation.note(item.message)
                        update[self.status] = self._status_text(
                            views.stage_line(item, self.preparation.step_text or None, auto)
                        )
                        if item.text is not None:
                            update[self.critique] = item.text
                            streamed = True
                        continue
                    value = item.value
                    if isinstance(value, tuple):
                        value, note = value
                    streamed = False
                    if isinstance(value, StudioState):
                        state = value
                        update.update(self._state_views(state, values, session_id))
                        self.history.record(values[self.history.browser], state)  # never raises
                        warn(state.base_round().warnings)
                    elif isinstance(value, str):
                        update[self.critique] = value
                        self.history.remember_critique(values[self.history.browser], state, value)
                yield update
        except StopRequested:
            note = "Stopped. The rounds made so far are kept."
            gr.Info(note)
        except IMGError as error:  # the user can fix it: one log line, a message on the page
            logger.warning("%s refused: %s", action, error)
            note = f"⚠️ {error}"
            gr.Warning(str(error))
        except Exception as error:  # a real failure: traceback in the log, the page stays usable
            logger.exception("%s failed", action)
            note = (
                f"⚠️ {action} failed ({type(error).__name__}: {error}). The rounds so far are kept; try again, "
                "or with fewer steps or a smaller preset."
            )
            gr.Warning(note)
        if note and note.startswith("Auto-refine stopped"):
            gr.Info(note)
        final = {self.status: self._status_text(note), **self._button_updates(state, busy=False),
                 self.timer: gr.Timer(active=False)}  # fmt: skip
        if streamed:  # the round it belonged to did not finish: back to the box's text for this base
            final[self.critique] = values[self.critique] if state is values[self.state] else ""
        self.history.busy.discard(session_id)
        yield final

    def _on_generate(self, values: dict, request: gr.Request):
        def produce(req, on_stage):
            return [self.studio.generate(req, values[self.state], on_stage)]

        yield from self._job(values, request, "Generate", produce)

    def _on_use_upload(self, values: dict, request: gr.Request):
        def produce(req, on_stage):
            return [self.studio.start_from_image(values[self.upload], req, values[self.state], on_stage)]

        yield from self._job(values, request, "Use your image", produce)

    def _on_critique(self, values: dict, request: gr.Request):
        def produce(req, on_stage):
            return [self.studio.critique(req, values[self.state], on_stage)]

        yield from self._job(values, request, "Critique", produce)

    def _on_refine(self, values: dict, request: gr.Request):
        def produce(req, on_stage):
            return [self.studio.refine(req, values[self.state], values[self.critique], on_stage)]

        yield from self._job(values, request, "Refine", produce)

    def _on_auto_refine(self, values: dict, request: gr.Request):
        rounds = values[self.auto_rounds]

        def produce(req, on_stage):
            return self.studio.auto_refine(
                req, values[self.state], values[self.critique], rounds, bool(values[self.stop_when_flat]), on_stage
            )

        try:
            shown_rounds = int(rounds)
        except (TypeError, ValueError):
            shown_rounds = None
        yield from self._job(values, request, "Auto-refine", produce, auto_rounds=shown_rounds)

    # --- instant events ---------------------------------------------------------------------------

    def _lock(self, state: StudioState) -> dict:
        return self._button_updates(state, busy=True)

    def _unlock(self, state: StudioState) -> dict:
        return self._button_updates(state, busy=False)

    def _unlock_after_failure(self, state: StudioState) -> dict:
        """After an error Gradio raised before or after the handler (its message is already shown)."""
        note = "⚠️ That did not work (see the message). Your rounds are kept; correct the input and try again."
        return {**self._button_updates(state, busy=False), self.status: self._status_text(note)}

    def _on_stop(self, request: gr.Request) -> None:
        """Ask this tab's running job to end at its next step (it says so in the status at once)."""
        stop = self._stops.get(getattr(request, "session_hash", None) or "default")
        if stop is not None:
            stop.set()

    def _on_reset(self) -> dict:
        state = StudioState()
        return {
            **self._state_views(state),
            **self._button_updates(state, busy=False),
            self.status: self._status_text(None),
            self.timer: gr.Timer(active=self.preparation.running),
        }

    def _rebased(self, index: int, state: StudioState, mode: str, prompt: str, seed) -> dict:
        """'Refine from here': round `index` becomes the base of the next round (nothing runs)."""
        try:
            state = state.with_base(index)
        except IMGError as error:
            gr.Warning(str(error))
            return {self.state: state}
        return {
            self.state: state,
            self.current: gr.update(value=png_file(state.base_round().image), label=views.base_label(state)),
            self.critique: gr.update(value="", label=views.critique_label(state)),
            self.next_use: self._next_use_note(state, mode, "", prompt, seed),
        }

    def _on_tick(self, state: StudioState) -> dict:
        """While the models prepare: the stage in the status and the button labels; stops when done."""
        return {
            **self._button_updates(state, busy=False),
            self.status: self._status_text(None),
            self.timer: gr.Timer(active=self.preparation.running),
        }

    def _on_page_load(self, state: StudioState) -> dict:
        """A new tab: start preparing the models if nothing else did (a failed preparation is retried)."""
        if not self.host.is_loaded and not self.preparation.running:
            self.preparation.start()
        return self._on_tick(state)

    def _on_unload(self, request: gr.Request) -> None:
        session_id = getattr(request, "session_hash", None) or "default"
        self._stops.pop(session_id, None)
        Studio.end_session(session_id)
        self.history.busy.discard(session_id)

    def _on_preset_choice(self, preset_name: str) -> dict:
        """Offer the MLLMs this preset's aligner takes guidance from (its own first)."""
        current = self.host.session.mllm_name if preset_name == self.host.preset.name else PRESETS[preset_name].mllm
        return gr.update(choices=compatible_mllms(preset_name), value=current)

    def _on_switch(self, values: dict) -> dict:
        try:
            with user_errors():
                self.host.switch(values[self.preset], values[self.mllm], values[self.quantization])
        except gr.Error as error:
            gr.Warning(str(error))
        except Exception as error:
            logger.exception("switching models failed")
            gr.Warning(f"switching models failed ({type(error).__name__}: {error}); the previous models stay")
        preset = self.host.preset
        return {
            self.status: self._status_text(None),
            self.banner: gr.update(value=views.TINY_BANNER.format(preset=preset.name), visible=preset.is_tiny),
            self.preset: gr.update(value=preset.name),
            self.mllm: gr.update(choices=compatible_mllms(preset.name), value=self.host.session.mllm_name),
            self.quantization: self.host.quantization,
            self.steps: preset.default_steps,
            self.guidance_scale: preset.default_guidance_scale,
            self.ip_scale: preset.ip_scale,
            self.aligner_passes: preset.aligner_passes,
        }


def setting_slider(name: str, value: float, note: str = "") -> gr.Slider:
    """A slider for a setting of `img_core.settings.LIMITS`: its range, step and label come from there."""
    limit = LIMITS[name]
    label = limit.label[0].upper() + limit.label[1:] + note
    return gr.Slider(limit.low, limit.high, value=value, step=limit.step, label=label, elem_id=name.replace("_", "-"))


def build_demo(
    session: IMGSession,
    allow_model_switch: bool = False,
    scorer: str | None = VQA_SCORER,
    prepare_models: bool = True,
    history: HistoryStore | None = None,
) -> gr.Blocks:
    """The app for `session`. With `prepare_models` the models start loading in a background thread now
    (the page shows at once and says how far they are); otherwise the first page load starts them.
    `scorer` scores every round (img_core.evaluation.scorers; None or "none": no scores). Launch with
    `launch_kwargs()` for the theme and CSS, which Gradio 6 takes in `launch()`. `history` keeps every
    browser's sessions (ui.history); None: no History panel, nothing stored."""
    host = ModelHost(session, allow_switch=allow_model_switch)
    ui = StudioUI(host, allow_model_switch=allow_model_switch, scorer=scorer, prepare_models=prepare_models,
                  history=history)  # fmt: skip
    demo = ui.demo
    demo.queue(default_concurrency_limit=1)
    demo.studio_ui = ui  # for tests and benchmarks: the host, its preparation and the Studio
    return demo


def launch_kwargs() -> dict:
    """What `demo.launch()` needs besides host and port: theme and CSS, and an upload size limit."""
    return {"theme": gr.themes.Soft(), "css": CSS + HISTORY_CSS, "max_file_size": MAX_UPLOAD}
