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

import dataclasses
import logging
import random
from collections.abc import Callable, Iterator

import gradio as gr

from img_core.errors import IMGError, InvalidInputError
from img_core.evaluation.scorers import VQA_SCORER
from img_core.presets import PRESETS
from img_core.session import IMGSession
from img_core.settings import (
    DEFAULT_AUTO_ROUNDS,
    DEFAULT_GUIDANCE_MODE,
    LIMITS,
    MLLM_QUANTIZATIONS,
    check_prompt,
)
from ui import views
from ui.examples import EXAMPLES
from ui.files import SERVED_FILES_MINUTES, served_files_delete_cache
from ui.handlers import PREPARATION_STEPS, ModelPreparation, Studio, user_errors
from ui.history import HistoryStore
from ui.history_panel import HISTORY_CSS, HistoryPanel
from ui.image_files import png_file
from ui.jobs import STOPPED_IN_QUEUE_NOTE, JobInputs, Jobs, JobUpdate
from ui.models import ModelHost, compatible_mllms
from ui.page_style import CSS, DOWNLOAD_JS, PAGE_JS, theme
from ui.state import GUIDANCE_CHOICES, RoundRequest, StudioState, effective_guidance

logger = logging.getLogger(__name__)

GPU_QUEUE = "gpu"  # concurrency id shared by every event that runs a model
MAX_UPLOAD = "25mb"  # larger uploads are refused before they reach the models
PREPARATION_POLL_SECONDS = 1.0  # how often the page asks how the model preparation goes
CARD_IMAGE_PX = 256  # height of a round card's image

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
        guidance_mode: str = DEFAULT_GUIDANCE_MODE,
        served_files_minutes: float = SERVED_FILES_MINUTES,
    ):
        self.host = host
        self.served_files_minutes = served_files_minutes
        self.default_guidance_mode = guidance_mode
        self.studio = Studio(host, scorer=scorer)
        self.preparation = ModelPreparation(host)
        self.allow_model_switch = allow_model_switch
        # Cheap events that change the tab's rounds: queued (Gradio reports state changes, which re-render
        # the strip, only for queued events) but outside the GPU group, so they never wait for a job.
        self.state_change = {"concurrency_limit": None, "api_visibility": "private", "show_progress": "hidden"}
        self.jobs = Jobs(self.studio, self.preparation)
        preparing = not host.is_loaded and prepare_models
        classes = ["img-studio-tiny"] if host.preset.is_tiny else []
        with gr.Blocks(title="IMG Studio", delete_cache=served_files_delete_cache(self.served_files_minutes)) as self.demo:
            self.state = gr.State(StudioState())
            self.history = HistoryPanel(self, history)  # the browser's id and its sessions (ui.history_panel)
            # What the MLLM wrote for the current base (Critique): the critique box holding anything else was
            # edited. Apart from `state`, so that a Critique does not re-render the round strip.
            self.mllm_critique = gr.State("")
            gr.Markdown(INTRO)
            self.banner = gr.Markdown(
                views.TINY_BANNER.format(preset=host.preset.name), visible=host.preset.is_tiny, elem_id="tiny-banner"
            )
            self.timer = gr.Timer(PREPARATION_POLL_SECONDS, active=preparing)
            self.buttons: dict[str, gr.Button] = {}
            self._status_bar(preparing)
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
                    self._examples()
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

    def _status_bar(self, preparing: bool) -> None:
        """One compact line, what runs now (or the models' state), with Stop: it stays at the top of the
        window while the page scrolls (CSS position: sticky), on a phone too."""
        with gr.Row(elem_id="status-bar", equal_height=True):
            self.status = gr.Markdown(self._status_text(None, preparing), elem_id="status")
            self._button("stop", preparing, variant="stop", scale=0, min_width=90)

    def _inputs(self, preparing: bool) -> None:
        # One line that grows to six: Enter generates, Shift+Enter adds a line.
        self.prompt = gr.Textbox(
            label="Prompt",
            lines=1,
            max_lines=6,
            placeholder="A green banana and a brown horse.",
            info="Enter generates; Shift+Enter adds a line.",
            elem_id="prompt",
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
        self.next_use = gr.Markdown(views.next_round_note(StudioState(), "auto", None, None), elem_id="next-use")
        with gr.Row():
            self._button("critique", preparing, variant="secondary")
            self._button("refine", preparing, variant="primary")
        with gr.Row():
            self._button("auto_refine", preparing, variant="secondary")
        with gr.Row():
            self.auto_rounds = setting_slider("auto_rounds", DEFAULT_AUTO_ROUNDS)
            self.stop_when_flat = gr.Checkbox(
                value=True,
                label="Stop when the score stops improving",
                visible=self.studio.scorer_name is not None,
                elem_id="stop-rule",
            )
        with gr.Row():
            self._button("download", preparing)
            self._button("reset", preparing, variant="stop", size="sm")
        self.download_file = gr.File(visible=False, elem_id="download-file")

    def _settings(self) -> None:
        preset = self.host.preset
        with gr.Accordion("Advanced settings", open=False):
            self.steps = setting_slider("steps", preset.default_steps)
            self.guidance_scale = setting_slider("guidance_scale", preset.default_guidance_scale)
            self.ip_scale = setting_slider("ip_scale", preset.ip_scale, " (paper: 0.2)")
            self.aligner_passes = setting_slider("aligner_passes", preset.aligner_passes, " (paper: 3)")
            self.guidance_mode = gr.Radio(
                list(GUIDANCE_CHOICES),
                value=self.default_guidance_mode,
                label="Guidance mode",
                info="auto: an edited critique steers (dialogue), an untouched one keeps the paper's guidance; "
                "question: always the paper's (the MLLM's question); dialogue: always the critique. The "
                "released aligners were trained on question-mode guidance.",
                elem_id="guidance-mode",
            )
            self.critique_note = gr.Markdown(views.CRITIQUE_NOTES["auto"])

    def _examples(self) -> None:
        """The example prompts. On a real preset each shows its round 0 and one Refine, made on the first
        click (by anyone) and cached for everyone after (Gradio's lazy example caching); the tiny preset's
        noise would teach nothing, so it keeps text examples."""
        examples = [list(example) for example in EXAMPLES]
        if self.host.preset.is_tiny:
            self.examples = gr.Examples(examples=examples, inputs=[self.prompt, self.seed], cache_examples=False)
            return
        with gr.Row():
            before = gr.Image(label="Example: round 0", type="pil", interactive=False, elem_id="example-before")
            after = gr.Image(label="Example: after one Refine", type="pil", interactive=False, elem_id="example-after")
        self.examples = gr.Examples(
            examples=examples,
            inputs=[self.prompt, self.seed],
            outputs=[before, after],
            fn=self.studio.example_rounds,
            cache_examples=True,
            cache_mode="lazy",
        )

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
            self_judged = self.studio.score_is_self_judged()  # known once the scorer has loaded
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
                        gr.Markdown(views.card_markdown(state, index, scorer, self_judged), elem_classes="round-caption")
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
                            self._rebase_handler(index),
                            [self.state, self.guidance_mode, self.prompt, self.seed],
                            [self.state, self.current, self.critique, self.mllm_critique, self.next_use],
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
            self.mllm_critique,
        ]  # fmt: skip
        self._job_inputs = {  # ui.jobs.JobInputs field -> the component it is read from
            "state": self.state, "prompt": self.prompt, "seed": self.seed, "steps": self.steps,
            "guidance_scale": self.guidance_scale, "ip_scale": self.ip_scale, "aligner_passes": self.aligner_passes,
            "guidance_mode": self.guidance_mode, "critique": self.critique, "mllm_critique": self.mllm_critique,
            "auto_rounds": self.auto_rounds,
            "upload": self.upload, "stop_when_flat": self.stop_when_flat,
        }  # fmt: skip
        request_inputs = {*self._job_inputs.values(), self.history.browser}
        instant = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        job = {
            "concurrency_id": GPU_QUEUE,
            "concurrency_limit": 1,
            "show_progress": "hidden",  # outputs keep their last value; the status line says what runs
        }

        def chain(trigger, fn, inputs, api_name=None, **kwargs):
            """Disable the buttons, run `fn` through the GPU queue, re-enable what can run next, whatever
            happened (`.then` runs after success, `.failure` after an error Gradio raised itself)."""
            visibility = {"api_visibility": "undocumented"} if api_name else {"api_visibility": "private"}
            running = trigger(self._lock, self.state, [*buttons, self.status, self.timer], **instant).then(
                fn, inputs, self.job_outputs, api_name=api_name, **job, **visibility, **kwargs
            )
            running.then(self._unlock, self.state, buttons, **instant)  # the job's own message stays
            running.then(self.history.listing, [self.history.browser, self.history.selected], self.history.list_outputs,
                         **instant)  # fmt: skip
            running.failure(self._unlock_after_failure, self.state, [*buttons, self.status], **instant)
            return running

        run = self._job_handler
        chain(self.buttons["generate"].click, run("generate"), request_inputs, "ui_generate")
        chain(self.prompt.submit, run("generate"), request_inputs)
        chain(self.buttons["use_upload"].click, run("use_upload"), request_inputs, "ui_use_upload")
        chain(self.buttons["critique"].click, run("critique"), request_inputs, "ui_critique")
        chain(self.buttons["refine"].click, run("refine"), request_inputs, "ui_refine")
        chain(self.buttons["auto_refine"].click, run("auto_refine"), request_inputs, "ui_auto_refine")
        if self.allow_model_switch:
            switch_outputs = [
                self.status, self.banner, self.preset, self.mllm, self.quantization,
                self.steps, self.guidance_scale, self.ip_scale, self.aligner_passes,
            ]  # fmt: skip
            switching = self.buttons["switch"].click(self._disable, self.state, buttons, **instant).then(
                self._on_switch, {self.preset, self.mllm, self.quantization}, switch_outputs,
                concurrency_id=GPU_QUEUE, concurrency_limit=1, api_visibility="private",
            )  # fmt: skip
            switching.then(self._unlock, self.state, buttons, **instant)
            switching.failure(self._unlock_after_failure, self.state, [*buttons, self.status], **instant)
            self.preset.change(self._on_preset_choice, self.preset, self.mllm, **instant)
        # Queued (outside the GPU group: it never waits) so that its message shows.
        self.buttons["stop"].click(self._on_stop, self.state, [*buttons, self.status, self.timer], **self.state_change)
        # The zip is built on the click, into a hidden file that the page then downloads.
        self.buttons["download"].click(
            self._on_download, self.state, self.download_file, api_name="ui_download", api_visibility="undocumented",
            concurrency_limit=None, show_progress="hidden",
        ).then(None, self.download_file, None, js=DOWNLOAD_JS)  # fmt: skip
        self.buttons["reset"].click(self._on_reset, None, self.job_outputs, **self.state_change).then(
            self.history.on_reset, self.history.browser, self.history.list_outputs, **instant
        )  # the old session stays in the History
        self.randomize.click(lambda: random.randint(0, int(LIMITS["seed"].high)), None, self.seed, **instant)
        self.guidance_mode.change(views.CRITIQUE_NOTES.get, self.guidance_mode, self.critique_note, **instant)
        gr.on(  # one listener, "always_last": the note follows the newest values, never a stale reply
            [self.guidance_mode.change, self.critique.input, self.critique.blur, self.prompt.change, self.seed.change],
            self._next_use_note,
            [self.state, self.guidance_mode, self.critique, self.prompt, self.seed, self.mllm_critique],
            self.next_use,
            trigger_mode="always_last",
            **instant,
        )
        self.timer.tick(self._on_tick, self.state, [*buttons, self.status, self.timer], **instant)
        self.demo.load(self._on_page_load, self.state, [*buttons, self.status, self.timer], **instant)
        self.demo.unload(self._on_unload)

    # --- what the page shows ----------------------------------------------------------------------

    def _status_text(self, now: str | None, preparing: bool | None = None) -> str:
        """The one status line: what runs now (or how the last job ended), else the models (preparing k/n,
        failed, loaded)."""
        if now:
            return views.public_text(now)
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
        return views.public_text(models)

    def _button_updates(self, state: StudioState, busy: bool) -> dict:
        preparing = self.preparation.running and not self.host.is_loaded
        can_run = views.button_states(state, busy, preparing=preparing)
        can_run["switch"] = can_run["switch"] and self.allow_model_switch
        step = self.preparation.step_text if preparing else None
        updates = {}
        for name, button in self.buttons.items():
            updates[button] = gr.update(interactive=can_run[name], value=views.button_label(name, step))
        return updates

    def _state_views(self, state: StudioState, values: dict | None = None, checked: RoundRequest | None = None) -> dict:
        """The base image, the critique box (emptied: its base changed) and the next-round note.
        `checked`: the click's request, whose prompt was checked already."""
        values = values or {}
        mode = values.get(self.guidance_mode, "auto")
        prompt = checked.prompt if checked else values.get(self.prompt)
        seed = checked.seed if checked else values.get(self.seed)
        return {
            self.state: state,
            self.current: gr.update(
                value=None if state.is_empty else png_file(state.base_round().image), label=views.base_label(state)
            ),
            self.critique: gr.update(value="", label=views.critique_label(state)),
            self.mllm_critique: "",  # a new base: nothing critiqued yet
            self.next_use: self._next_use_note(state, mode, "", prompt, seed, checked=checked is not None),
        }

    def _on_download(self, state: StudioState, request: gr.Request) -> str | None:
        """Download: the zip of every round so far, built now (nothing is zipped while rounds are made)."""
        try:
            return str(self.studio.export(state, tab_id(request)))
        except gr.Error as error:
            gr.Warning(views.public_text(str(error)))
        except Exception:  # the rounds are still on the page; the next click tries again
            logger.exception("writing the session zip failed")
            gr.Warning("the zip could not be written; your rounds are kept, try Download again")
        return None

    def _next_use_note(
        self, state: StudioState, mode: str, critique: str | None, prompt=None, seed=None, mllm_critique: str = "",
        checked: bool = False,
    ) -> str:  # fmt: skip
        """What the next round will use. `mode`: the page's choice ("auto" resolved here); `checked`: `prompt`
        is a job's already checked prompt."""
        choice, mode = mode, effective_guidance(mode, critique, mllm_critique)
        question = None
        if mode == "question" and not state.is_empty and self.host.is_loaded:
            try:
                if not prompt:
                    text = state.rounds[0].prompt
                else:
                    text = prompt if checked else check_prompt(prompt).prompt
                question = self.host.session.critic.question_for(text, int(seed if seed is not None else 0))
            except (IMGError, TypeError, ValueError):
                question = None
        return views.next_round_note(state, mode, question, critique, choice)

    # --- jobs (ui.jobs runs them; here their updates become the page's) -----------------------------

    def _job_handler(self, action: str) -> Callable[[dict, gr.Request], Iterator[dict]]:
        """The event handler of a model job: the page's values by name in, `ui.jobs.JobUpdate`s out as
        updates of the components."""

        def handler(values: dict, request: gr.Request) -> Iterator[dict]:
            inputs = JobInputs(**{name: values[component] for name, component in self._job_inputs.items()})
            browser, tab, state = values[self.history.browser], tab_id(request), values[self.state]
            self.history.busy.add(tab)  # no History restore or delete in this tab until the job ends
            session_id = None  # set when the History stored this tab's rounds as a new session (history_panel)
            try:
                for update in self.jobs.run(action, inputs, tab):
                    if update.state is not None and session_id is not None:
                        update = dataclasses.replace(update, state=dataclasses.replace(update.state,
                                                                                       session_id=session_id))
                    if update.state is not None and not update.finished:
                        state = self.history.record(browser, update.state)  # each round as it completes
                        if state.session_id != update.state.session_id:
                            session_id = state.session_id
                            update = dataclasses.replace(update, state=state)
                    if update.mllm_critique:
                        self.history.remember_critique(browser, state, update.mllm_critique)
                    yield self._shown(update, values)
            finally:
                self.history.busy.discard(tab)

        return handler

    def _shown(self, update: JobUpdate, values: dict) -> dict:
        """A job's update as component updates; the last one re-enables the buttons."""
        if update.finished:
            final = {self.status: self._status_text(update.status),
                     **self._button_updates(update.state, busy=False), self.timer: gr.Timer(active=False)}  # fmt: skip
            if update.critique is not None:
                final[self.critique] = update.critique
            return final
        shown: dict = {}
        if update.status is not None:
            shown[self.status] = self._status_text(update.status)
        if update.state is not None:
            shown.update(self._state_views(update.state, values, update.request))
        if update.critique is not None:
            shown[self.critique] = update.critique
        if update.mllm_critique is not None:
            shown[self.mllm_critique] = update.mllm_critique
        return shown

    # --- instant events ---------------------------------------------------------------------------

    def _lock(self, state: StudioState, request: gr.Request) -> dict:
        """A job was clicked: it waits in the GPU queue from now on (Stop ends it there too); the status
        says where it stands, and the timer keeps saying so until it starts."""
        tab = tab_id(request)
        self.jobs.queued(tab)
        return {
            **self._button_updates(state, busy=True),
            self.status: self._status_text(views.queue_line(self.jobs.jobs_ahead(tab))),
            self.timer: gr.Timer(active=True),
        }

    def _disable(self, state: StudioState) -> dict:
        """A model switch was clicked: only Stop stays usable."""
        return self._button_updates(state, busy=True)

    def _unlock(self, state: StudioState, request: gr.Request) -> dict:
        """After a job: what can run now (nothing changes while another job of this tab waits)."""
        if self.jobs.busy(tab_id(request)):
            return {self.buttons["stop"]: gr.update()}  # nothing changes (an empty dict would be one value)
        return self._button_updates(state, busy=False)

    def _unlock_after_failure(self, state: StudioState, request: gr.Request) -> dict:
        """After an error Gradio raised before or after the handler (its message is already shown)."""
        self.jobs.forget_waiting(tab_id(request))
        note = "⚠️ That did not work (see the message). Your rounds are kept; correct the input and try again."
        return {**self._button_updates(state, busy=False), self.status: self._status_text(note)}

    def _on_stop(self, state: StudioState, request: gr.Request) -> dict:
        """End this tab's job: a waiting one at once, without running (said here), a running one at its next
        step (the job says so)."""
        if not self.jobs.stop(tab_id(request)):
            return {self.status: gr.update()}  # a running job says itself that it stops
        gr.Info(STOPPED_IN_QUEUE_NOTE)
        return {
            **self._button_updates(state, busy=False),
            self.status: self._status_text(STOPPED_IN_QUEUE_NOTE),
            self.timer: gr.Timer(active=self.preparation.running),
        }

    def _on_reset(self) -> dict:
        state = StudioState()
        return {
            **self._state_views(state),
            **self._button_updates(state, busy=False),
            self.status: self._status_text(None),
            self.timer: gr.Timer(active=self.preparation.running),
        }

    def _rebase_handler(self, index: int) -> Callable[..., dict]:
        def rebase(state: StudioState, mode: str, prompt: str, seed, request: gr.Request) -> dict:
            return self._rebased(index, state, mode, prompt, seed, tab_id(request))

        return rebase

    def _rebased(self, index: int, state: StudioState, mode: str, prompt: str, seed, tab: str = "default") -> dict:
        """'Refine from here': round `index` becomes the base of the next round (nothing runs). Refused,
        with a message, while a job of this tab waits or runs: its result would override the choice."""
        if self.jobs.busy(tab):
            gr.Warning(views.REBASE_DURING_A_JOB)
            return {self.next_use: gr.update()}  # nothing changes
        try:
            state = state.with_base(index)
        except IMGError as error:
            gr.Warning(views.public_text(str(error)))
            return {self.state: state}
        return {
            self.state: state,
            self.current: gr.update(value=png_file(state.base_round().image), label=views.base_label(state)),
            self.critique: gr.update(value="", label=views.critique_label(state)),
            self.mllm_critique: "",
            self.next_use: self._next_use_note(state, mode, "", prompt, seed),
        }

    def _on_tick(self, state: StudioState, request: gr.Request) -> dict:
        """While this tab's job waits: where it stands in the queue. While the models prepare: the stage in
        the status and the button labels. Stops when neither."""
        tab = tab_id(request)
        if self.jobs.waiting(tab):
            return {self.status: self._status_text(views.queue_line(self.jobs.jobs_ahead(tab)))}
        if self.jobs.busy(tab):  # running: the job shows its own progress
            return {self.timer: gr.Timer(active=False)}
        return {
            **self._button_updates(state, busy=False),
            self.status: self._status_text(None),
            self.timer: gr.Timer(active=self.preparation.running),
        }

    def _on_page_load(self, state: StudioState, request: gr.Request) -> dict:
        """A new tab: start preparing the models if nothing else did (a failed preparation is retried)."""
        if not self.host.is_loaded and not self.preparation.running:
            self.preparation.start()
        return self._on_tick(state, request)

    def _on_unload(self, request: gr.Request) -> None:
        self.jobs.end(tab_id(request))
        self.history.busy.discard(tab_id(request))
        Studio.end_session(tab_id(request))

    def _on_preset_choice(self, preset_name: str) -> dict:
        """Offer the MLLMs this preset's aligner takes guidance from (its own first)."""
        current = self.host.session.mllm_name if preset_name == self.host.preset.name else PRESETS[preset_name].mllm
        return gr.update(choices=compatible_mllms(preset_name), value=current)

    def _on_switch(self, values: dict) -> dict:
        try:
            with user_errors():
                self.host.switch(values[self.preset], values[self.mllm], values[self.quantization])
        except gr.Error as error:
            gr.Warning(views.public_text(str(error)))
        except Exception as error:
            logger.exception("switching models failed")
            gr.Warning(views.public_text(f"switching models failed ({type(error).__name__}: {error}); the previous models stay"))
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


def tab_id(request: gr.Request | None) -> str:
    """The browser tab an event came from (Gradio's session hash)."""
    return getattr(request, "session_hash", None) or "default"


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
    guidance_mode: str = DEFAULT_GUIDANCE_MODE,
    served_files_minutes: float = SERVED_FILES_MINUTES,
) -> gr.Blocks:
    """The app for `session`. With `prepare_models` the models start loading in a background thread now
    (the page shows at once and says how far they are); otherwise the first page load starts them.
    `scorer` scores every round (img_core.evaluation.scorers; None or "none": no scores). Launch with
    `launch_kwargs()` for the theme and CSS, which Gradio 6 takes in `launch()`. `history` keeps every
    browser's sessions (ui.history); None: no History panel, nothing stored. `guidance_mode` is the page's
    default Guidance mode (img_core.settings.GUIDANCE_MODES; "dialogue" for an aligner trained on it).
    Uploads and served result files are removed after `served_files_minutes`."""
    host = ModelHost(session, allow_switch=allow_model_switch)
    if guidance_mode not in GUIDANCE_CHOICES:
        raise InvalidInputError(f"guidance mode must be one of {', '.join(GUIDANCE_CHOICES)}, got {guidance_mode!r}")
    ui = StudioUI(host, allow_model_switch=allow_model_switch, scorer=scorer, prepare_models=prepare_models,
                  history=history, guidance_mode=guidance_mode,
                  served_files_minutes=served_files_minutes)  # fmt: skip
    demo = ui.demo
    demo.queue(default_concurrency_limit=1)
    demo.studio_ui = ui  # for tests and benchmarks: the host, its preparation and the Studio
    return demo


def launch_kwargs() -> dict:
    """What `demo.launch()` needs besides host and port: theme and CSS, and an upload size limit."""
    return {"theme": theme(), "css": CSS + HISTORY_CSS, "js": PAGE_JS, "max_file_size": MAX_UPLOAD}
