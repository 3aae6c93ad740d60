"""The Gradio Blocks of IMG Studio: widgets, their events, and the stateless API endpoints.

Every event reads its widgets by name into a `RoundRequest` (inputs are passed as a set, so the
handler receives a dict keyed by component), calls `ui.handlers.Studio`, and returns a dict of
updates. Events that run models share one concurrency group of size 1: one GPU job at a time through
the queue. Each browser session keeps its rounds in its own `gr.State`.
"""

import random

import gradio as gr

from img_core.settings import GUIDANCE_MODES, LIMITS, MLLM_QUANTIZATIONS
from img_core.presets import PRESETS
from img_core.session import IMGSession
from ui import views
from ui.examples import EXAMPLES
from ui.handlers import Studio, user_errors
from ui.image_files import png_file
from ui.models import ModelHost, compatible_mllms
from ui.state import RoundRequest, StudioState

GPU_QUEUE = "gpu"  # concurrency id shared by every event that runs a model
AUTO_ROUNDS = 2  # default of the Auto-refine slider
MAX_UPLOAD = "25mb"  # larger uploads are refused before they reach the models

CSS = """
#tiny-banner { border: 2px solid #d97706; border-radius: 8px; padding: 4px 12px; background: #fffbeb; }
#tiny-banner * { color: #78350f !important; }
.img-studio-tiny img { image-rendering: pixelated; }
#original-image img, #current-image img { width: 100%; height: 100%; object-fit: contain; }
"""

INTRO = """# IMG Studio
Generate an image, let a multimodal LLM critique how it misses the prompt, and re-generate it with
**Implicit Multimodal Guidance** (IMG, ICCV 2025): the critique's hidden states re-align the image's
IP-Adapter features, and the same model re-draws the image from the same prompt and seed. Repeat for more
rounds; click any round to refine from it instead."""


class StudioUI:
    """Builds the page for one `ModelHost`; `self.demo` is the gr.Blocks."""

    def __init__(self, host: ModelHost, allow_model_switch: bool = True):
        self.host = host
        self.studio = Studio(host)
        self.allow_model_switch = allow_model_switch
        preset = host.preset
        classes = ["img-studio-tiny"] if preset.is_tiny else []
        with gr.Blocks(title="IMG Studio", delete_cache=(3600, 3600)) as self.demo:
            self.state = gr.State(StudioState())
            gr.Markdown(INTRO)
            self.banner = gr.Markdown(
                views.TINY_BANNER.format(preset=preset.name), visible=preset.is_tiny, elem_id="tiny-banner"
            )
            self.status = gr.Markdown(host.status_line(), elem_id="model-status")
            with gr.Row(elem_classes=classes):
                with gr.Column(scale=2, min_width=320):
                    self._inputs()
                with gr.Column(scale=3, min_width=420):
                    self._outputs()
            self._api_endpoints()
            self._events()

    # --- layout -----------------------------------------------------------------------------------

    def _inputs(self) -> None:
        preset = self.host.preset
        self.prompt = gr.Textbox(
            label="Prompt", lines=2, placeholder="A green banana and a brown horse.", elem_id="prompt"
        )
        with gr.Row():
            self.seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=LIMITS["seed"].high, elem_id="seed")
            self.randomize = gr.Button("Random seed", size="sm", scale=0)
        self.buttons = {"generate": gr.Button("Generate", variant="primary", elem_id="generate-btn")}
        can_run = self._can_run(StudioState())
        with gr.Accordion("Start from your own image", open=False):
            self.upload = gr.Image(
                label="Your image", type="pil", sources=["upload", "clipboard"], format="png", elem_id="upload-image"
            )
            self.buttons["use_upload"] = gr.Button(
                "Use it as round 0 (with the prompt above)", elem_id="use-upload-btn"
            )
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
            self.auto_rounds = setting_slider("auto_rounds", AUTO_ROUNDS)
        with gr.Accordion("Models", open=False):
            self.preset = gr.Dropdown(
                list(PRESETS),
                value=preset.name,
                label="Preset (diffusion backend + MLLM)",
                interactive=self.allow_model_switch,
            )
            self.mllm = gr.Dropdown(
                compatible_mllms(preset.name),
                value=self.host.session.mllm_name,
                label="MLLM (those whose guidance this preset's aligner was trained for)",
                interactive=self.allow_model_switch,
            )
            self.quantization = gr.Dropdown(
                list(MLLM_QUANTIZATIONS),
                value=self.host.quantization,
                label="MLLM quantization",
                interactive=self.allow_model_switch,
            )
            self.buttons["switch"] = gr.Button(
                "Switch models (affects everyone using this app)", interactive=can_run["switch"]
            )
            gr.Markdown("\n".join(f"- `{p.name}`: {p.description}" for p in PRESETS.values()))
        gr.Examples(
            examples=[list(example) for example in EXAMPLES], inputs=[self.prompt, self.seed], cache_examples=False
        )

    def _outputs(self) -> None:
        can_run = self._can_run(StudioState())
        with gr.Row():
            shown_image = {"type": "pil", "format": "png", "interactive": False, "height": 320}
            self.original = gr.Image(label="Original (round 0)", elem_id="original-image", **shown_image)
            self.current = gr.Image(label="Base of the next round", elem_id="current-image", **shown_image)
        self.critique = gr.Textbox(
            label="Critique (editable)",
            lines=4,
            placeholder="Click Critique for the MLLM's analysis of the base image, then edit it if you like.",
            elem_id="critique",
        )
        self.critique_note = gr.Markdown(views.CRITIQUE_NOTES["question"])
        with gr.Row():
            for name, text, variant in [
                ("critique", "Critique", "secondary"),
                ("refine", "Refine", "primary"),
                ("auto_refine", auto_refine_label(AUTO_ROUNDS), "secondary"),
                ("reset", "Reset", "stop"),
            ]:
                self.buttons[name] = gr.Button(
                    text, variant=variant, interactive=can_run[name], elem_id=f"{name.replace('_', '-')}-btn"
                )
        self.gallery = gr.Gallery(
            label="All rounds (click one to make it the base of the next round)",
            format="png",
            columns=4,
            fit_columns=False,
            height=250,  # one row of thumbnails; later rounds scroll
            object_fit="contain",
            elem_id="rounds-gallery",
        )
        self.log = gr.Markdown(views.round_log(StudioState()), elem_id="round-log")
        with gr.Row():
            self.buttons["download"] = gr.Button(
                "Download session (.zip)", elem_id="download-btn", interactive=can_run["download"]
            )
            self.download = gr.File(
                label="Session zip: round_*.png + session.json", interactive=False, visible=False, elem_id="session-zip"
            )

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
        shown = [self.state, self.original, self.current, self.critique, self.gallery, self.log, self.status]
        request_inputs = {
            self.state, self.prompt, self.seed, self.steps, self.guidance_scale, self.ip_scale,
            self.aligner_passes, self.guidance_mode, self.critique, self.auto_rounds, self.upload,
        }  # fmt: skip
        gpu = {"concurrency_id": GPU_QUEUE, "concurrency_limit": 1}
        ui_api = {"api_visibility": "undocumented"}

        def chain(trigger, fn, inputs, outputs, api_name=None, **kwargs):
            """Disable the buttons, run `fn` through the GPU queue, re-enable what can run next."""
            visibility = ui_api if api_name else {"api_visibility": "private"}
            return (
                trigger(self._lock, None, buttons, queue=False, api_visibility="private")
                .then(fn, inputs, outputs, api_name=api_name, **gpu, **visibility, **kwargs)
                .then(self._unlock, self.state, buttons, queue=False, api_visibility="private")
            )

        chain(self.buttons["generate"].click, self._on_generate, request_inputs, shown, "ui_generate")
        chain(self.prompt.submit, self._on_generate, request_inputs, shown)
        chain(self.buttons["use_upload"].click, self._on_use_upload, request_inputs, shown, "ui_use_upload")
        chain(
            self.buttons["critique"].click,
            self._on_critique,
            request_inputs,
            [self.critique, self.status],
            "ui_critique",
        )
        chain(self.buttons["refine"].click, self._on_refine, request_inputs, shown, "ui_refine")
        chain(self.buttons["auto_refine"].click, self._on_auto_refine, request_inputs, shown, "ui_auto_refine")
        chain(
            self.buttons["switch"].click,
            self._on_switch,
            {self.preset, self.mllm, self.quantization},
            [
                self.status, self.banner, self.preset, self.mllm, self.quantization,
                self.steps, self.guidance_scale, self.ip_scale, self.aligner_passes,
            ],
        )  # fmt: skip
        instant = {"queue": False, "api_visibility": "private"}  # cheap UI-only events, no model
        self.preset.change(self._on_preset_choice, self.preset, self.mllm, **instant)
        self.buttons["reset"].click(self._on_reset, None, [*shown, self.download], **instant).then(
            self._unlock, self.state, buttons, **instant
        )
        self.buttons["download"].click(self._on_download, self.state, self.download, api_name="ui_download", **ui_api)
        self.gallery.select(self._on_select, self.state, shown, **instant)
        self.randomize.click(lambda: random.randint(0, int(LIMITS["seed"].high)), None, self.seed, **instant)
        self.guidance_mode.change(views.CRITIQUE_NOTES.get, self.guidance_mode, self.critique_note, **instant)
        self.auto_rounds.change(auto_refine_label, self.auto_rounds, self.buttons["auto_refine"], **instant)
        self.demo.load(self.host.status_line, None, self.status, **instant)

    def _lock(self) -> list:
        return [gr.update(interactive=False) for _ in self.buttons]

    def _can_run(self, state: StudioState) -> dict[str, bool]:
        can_run = views.button_states(state, busy=False)
        can_run["switch"] = can_run["switch"] and self.allow_model_switch
        return can_run

    def _unlock(self, state: StudioState) -> list:
        can_run = self._can_run(state)
        return [gr.update(interactive=can_run[name]) for name in self.buttons]

    def _request(self, values: dict) -> RoundRequest:
        with user_errors():
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

    def _show(self, state: StudioState) -> dict:
        """Every view of `state`; the critique box is emptied because its base changed."""
        return {
            self.state: state,
            self.original: png_file(state.rounds[0].image) if not state.is_empty else None,
            self.current: gr.update(
                value=None if state.is_empty else png_file(state.base_round().image), label=views.base_label(state)
            ),
            self.critique: gr.update(value="", label=views.critique_label(state)),
            self.gallery: views.gallery_items(state),
            self.log: views.round_log(state),
            self.status: self.host.status_line(),
        }

    def _on_generate(self, values: dict, progress=gr.Progress(track_tqdm=True)) -> dict:
        request = self._request(values)
        return self._show(self.studio.generate(request, values[self.state], progress=progress))

    def _on_use_upload(self, values: dict, progress=gr.Progress(track_tqdm=True)) -> dict:
        request = self._request(values)
        state = self.studio.start_from_image(values[self.upload], request, values[self.state], progress=progress)
        return self._show(state)

    def _on_critique(self, values: dict, progress=gr.Progress(track_tqdm=True)) -> dict:
        text = self.studio.critique(self._request(values), values[self.state], progress=progress)
        return {self.critique: text, self.status: self.host.status_line()}

    def _on_refine(self, values: dict, progress=gr.Progress(track_tqdm=True)) -> dict:
        request = self._request(values)
        state = self.studio.refine(request, values[self.state], values[self.critique], progress=progress)
        return self._show(state)

    def _on_auto_refine(self, values: dict, progress=gr.Progress(track_tqdm=True)):
        request = self._request(values)
        rounds = int(values[self.auto_rounds])
        states = self.studio.auto_refine(request, values[self.state], values[self.critique], rounds, progress=progress)
        for state in states:
            yield self._show(state)

    def _on_select(self, state: StudioState, event: gr.SelectData) -> dict:
        return self._show(self.studio.select(state, event.index))

    def _on_reset(self) -> dict:
        return {**self._show(StudioState()), self.download: gr.update(value=None, visible=False)}

    def _on_download(self, state: StudioState):
        return gr.update(value=str(self.studio.export(state)), visible=True)

    def _on_preset_choice(self, preset_name: str) -> dict:
        """Offer the MLLMs this preset's aligner takes guidance from (its own first)."""
        current = self.host.session.mllm_name if preset_name == self.host.preset.name else PRESETS[preset_name].mllm
        return gr.update(choices=compatible_mllms(preset_name), value=current)

    def _on_switch(self, values: dict, progress=gr.Progress(track_tqdm=True)) -> dict:
        progress(0.0, desc="Switching models")
        with user_errors():
            self.host.switch(values[self.preset], values[self.mllm], values[self.quantization], progress=progress)
        preset = self.host.preset
        return {
            self.status: self.host.status_line(),
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


def auto_refine_label(rounds: float) -> str:
    return f"Auto-refine {int(rounds)} round{'s' if int(rounds) != 1 else ''}"


def build_demo(session: IMGSession, allow_model_switch: bool = True) -> gr.Blocks:
    """The app for `session` (nothing is loaded here). Launch with `launch_kwargs()` for the theme and
    CSS, which Gradio 6 takes in `launch()`."""
    demo = StudioUI(ModelHost(session, allow_switch=allow_model_switch), allow_model_switch=allow_model_switch).demo
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_kwargs() -> dict:
    """What `demo.launch()` needs besides host and port: theme and CSS, and an upload size limit."""
    return {"theme": gr.themes.Soft(), "css": CSS, "max_file_size": MAX_UPLOAD}
