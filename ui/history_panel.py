"""The History panel of the studio page, and what ties a browser tab to the history store (`ui.history`).

Each browser gets a random id, kept in its local storage through `gr.BrowserState` (made on its first
visit). A round is stored as it completes (`record`, from the job's update loop); a failure of the store
is logged, shown once (until a write works again) and the round stays on the page. A page load restores the
browser's current session: its rounds, base, critique, prompt and seed. The panel lists the browser's
sessions (thumbnail, prompt, rounds, date); a click on one restores it, and "Delete" removes the
selected one. Generate, an upload and Reset start a new session (`StudioState.started`); the old one
stays in the History, so nothing disappears without the user's say.

The browser's storage is encrypted with a fixed key only so that the value survives a restart: the key is
sent to every page, so it protects nothing; the id's 192 random bits do.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from typing import Any

import gradio as gr

from ui.files import app_subfolder
from ui.history import (
    HistoryStore,
    SessionClashError,
    StoredSession,
    is_browser_id,
    is_session_id,
    new_browser_id,
    new_session_id,
)
from ui.image_files import png_file
from ui.state import StudioState

logger = logging.getLogger(__name__)

STORAGE_KEY = "img-studio-browser-id"
STORAGE_SECRET = "img-studio-history"  # not a secret: see the module docstring
CAPTION_CHARS = 48
FORKED = ("Another tab went on from this session, so this tab's rounds are kept as a new session in the "
          "History; both tabs' rounds are there.")
STORE_FAILED = (
    "Saving to your History failed, so a reload may not bring these rounds back (the rounds stay on this "
    "page; use Download to keep them). The server log says why."
)
# Small fixed-size thumbnails in as many columns as fit, each with its caption readable below the image;
# the panel is as tall as its rows, up to 470 px, then scrolls.
HISTORY_CSS = """
#history-gallery .grid-wrap { min-height: 0 !important; max-height: 470px !important; height: auto !important; }
#history-gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(160px, 200px)) !important;
  grid-template-rows: none !important; grid-auto-rows: 225px !important; }
#history-gallery .thumbnail-item > img { height: 160px !important; object-fit: contain; image-rendering: pixelated; }
#history-gallery .thumbnail-item { align-items: flex-start; }
#history-gallery .caption-label { opacity: 1 !important; white-space: normal; max-width: 100%; left: 0; right: 0;
  bottom: 0; font-size: 12px; line-height: 1.3; max-height: 62px; }
"""
EMPTY_NOTE = "*Your sessions appear here as you make rounds. They are kept on this server for this browser only.*"


class HistoryPanel:
    """The browser's id and the History panel of one page (`ui.layout.StudioUI`, not imported here: it
    imports this module); `store` None: no history (the panel is hidden and nothing is written)."""

    def __init__(self, studio_ui: Any, store: HistoryStore | None):
        self.ui = studio_ui
        self.store = store
        self._warned: set[str] = set()  # browsers told that the store failed
        self.busy: set[str] = set()  # tabs (Gradio session hashes) whose job runs: the page's job marks them
        self.browser = gr.BrowserState("", storage_key=STORAGE_KEY, secret=STORAGE_SECRET)
        self.ids = gr.State([])  # the session id of each gallery item
        self.selected = gr.State(None)  # the session id the user last clicked

    # --- layout -----------------------------------------------------------------------------------

    def build(self) -> None:
        with gr.Accordion("History", open=False, visible=self.store is not None, elem_id="history-panel") as panel:
            self.accordion = panel
            self.note = gr.Markdown(EMPTY_NOTE, elem_id="history-note")
            self.gallery = gr.Gallery(
                label="Your sessions (click one to restore it)", columns=6, allow_preview=False,
                object_fit="contain", elem_id="history-gallery", interactive=False,
            )  # fmt: skip
            self.delete_button = gr.Button(
                "Delete the selected session", variant="stop", size="sm", interactive=False, elem_id="history-delete-btn"
            )

    @property
    def list_outputs(self) -> list:
        return [self.gallery, self.ids, self.note, self.accordion, self.delete_button, self.selected]

    def wire(self) -> None:
        """The panel's events (after the page's own: a restore ends by re-enabling the page's buttons)."""
        ui = self.ui
        if self.store is None:
            return
        buttons = list(ui.buttons.values())
        page = [ui.state, ui.current, ui.critique, ui.mllm_critique, ui.next_use, ui.prompt, ui.seed, *buttons]
        state_change = ui.state_change
        ui.demo.load(self.on_load, self.browser, [self.browser, *page, *self.list_outputs], **state_change)
        self.gallery.select(self.on_select, [self.browser, self.ids], [*page, *self.list_outputs], **state_change)
        self.delete_button.click(
            self.on_delete, [self.browser, self.selected, ui.state], [*page, *self.list_outputs], **state_change
        )

    # --- called by the page's own events ----------------------------------------------------------

    def record(self, browser: Any, state: StudioState) -> StudioState:
        """Store the rounds of `state` not stored yet; returns the state to go on with. When another tab of
        this browser went on from the same session (its rounds hold the same numbers), this tab's rounds
        are stored as a new session and the state returned carries its id: both tabs' work is kept. Never
        raises: a failure is logged and shown once."""
        if self.store is None or state.is_empty or not is_browser_id(browser) or not state.session_id:
            return state
        try:
            try:
                self.store.save(browser, state.session_id, state.rounds, state.base, png_file=png_file)
            except SessionClashError as clash:
                logger.info("history: %s; this tab goes on as a new session", clash)
                state = dataclasses.replace(state, session_id=new_session_id())
                self.store.save(browser, state.session_id, state.rounds, state.base, png_file=png_file)
                gr.Info(FORKED)
        except Exception:
            self._failed(browser, "storing a round")
        else:
            self._warned.discard(browser)  # a later failure is told again
        return state

    def remember_critique(self, browser: Any, state: StudioState, critique: str) -> None:
        """The critique shown for the base (restored with the session)."""
        self._set_view(browser, state, critique)

    def remember_base(self, browser: Any, state: StudioState) -> None:
        """'Refine from here' chose another base (the critique box was emptied)."""
        self._set_view(browser, state, "")

    def _set_view(self, browser: Any, state: StudioState, critique: str) -> None:
        if self.store is None or state.is_empty or not is_browser_id(browser) or not state.session_id:
            return
        try:
            self.store.set_view(browser, state.session_id, state.base, critique)
        except Exception:
            self._failed(browser, "storing the base and critique")

    def on_reset(self, browser: Any) -> dict:
        """Reset: the page is empty, so a reload shows an empty page; the session stays in the History."""
        if self.store is not None and is_browser_id(browser):
            try:
                self.store.set_current(browser, None)
            except Exception:
                self._failed(browser, "Reset")
        return self.listing(browser)

    def listing(self, browser: Any, selected: str | None = None) -> dict:
        """The panel's gallery, note and label for this browser."""
        if self.store is None or not is_browser_id(browser):
            return self._unchanged()
        try:
            summaries = self.store.sessions(browser)
        except Exception:
            self._failed(browser, "listing the History")
            return self._unchanged()
        thumbs = app_subfolder("history-thumbs")
        items, ids = [], []
        for summary in summaries:
            if summary.thumbnail is None:
                continue
            shown = thumbs / f"{summary.id}-{int(summary.updated * 1000)}.png"  # Gradio serves from the app folder
            if not shown.exists():
                shutil.copyfile(summary.thumbnail, shown)
            when = time.strftime("%b %d %H:%M", time.gmtime(summary.updated))
            rounds = "1 round" if summary.rounds == 1 else f"{summary.rounds} rounds"
            items.append((str(shown), f"{rounds} · {when} UTC · {_short(summary.prompt)}"))
            ids.append(summary.id)
        selected = selected if selected in ids else None
        if not items:
            note = EMPTY_NOTE
        elif selected:
            note = f"Selected: *{_short(summaries[ids.index(selected)].prompt)}*. Click another to restore it."
        else:
            note = "Click a session to restore it; Delete removes the one you selected."
        return {
            self.gallery: gr.update(
                value=items or None,
                selected_index=ids.index(selected) if selected else None,  # the highlight follows its session
            ),
            self.ids: ids,
            self.note: note,
            self.accordion: gr.update(label=f"History ({len(ids)} session{'s' if len(ids) != 1 else ''})"),
            self.delete_button: gr.update(interactive=selected is not None),
            self.selected: selected,
        }

    # --- the panel's events -----------------------------------------------------------------------

    def on_load(self, browser: Any, request: gr.Request) -> dict:
        """A page load: give a new browser its id; otherwise restore its current session."""
        if not is_browser_id(browser):
            browser = new_browser_id()
            return {self.browser: browser, **self.listing(browser)}
        update: dict = {self.browser: browser}
        try:
            current = self.store.current(browser)
            stored = self.store.load(browser, current) if current else None
        except Exception:
            self._failed(browser, "restoring the session")
            stored = None
        if stored is not None and stored.rounds:
            update.update(self._shown(stored, request))
        update.update(self.listing(browser))
        return update

    def on_select(self, browser: Any, ids: list[str], event: gr.SelectData, request: gr.Request) -> dict:
        """A click on a session: restore it on the page and make it the browser's current session."""
        index = event.index if isinstance(event.index, int) else None
        if self._tab_busy(request):
            return self._unchanged()
        if not is_browser_id(browser) or index is None or not 0 <= index < len(ids):
            return self._unchanged()
        session_id = ids[index]
        try:
            stored = self.store.load(browser, session_id)
            if stored is not None and stored.rounds:
                self.store.set_current(browser, session_id)
        except Exception:
            self._failed(browser, "restoring a session")
            return self._unchanged()
        if stored is None or not stored.rounds:
            gr.Warning("That session could not be restored: none of its images could be read.")
            return self.listing(browser)
        return {**self._shown(stored, request), **self.listing(browser, selected=session_id)}

    def on_delete(self, browser: Any, selected: Any, state: StudioState, request: gr.Request) -> dict:
        """Delete the selected session; when it is the one on the page, the page is emptied too."""
        if self._tab_busy(request):
            return self._unchanged()
        if not is_browser_id(browser) or not is_session_id(selected):
            gr.Warning("Select a session first (click it), then Delete.")
            return self._unchanged()
        try:
            self.store.delete(browser, selected)
        except Exception:
            self._failed(browser, "deleting a session")
            return self._unchanged()
        update = self.listing(browser)
        if state.session_id == selected:
            update.update(self._page(StudioState(), "", request))
        return update

    # --- helpers ----------------------------------------------------------------------------------

    def _unchanged(self) -> dict:
        """An update that changes nothing (Gradio reads an empty dict as one value, not as no updates)."""
        return {self.note: gr.update()}

    def _shown(self, stored: StoredSession, request: gr.Request) -> dict:
        """The page showing `stored`: its rounds, base and critique, the prompt and seed of round 0."""
        for message in stored.skipped:
            gr.Warning(f"This session's {message}; it was left out.")
        state = StudioState(rounds=stored.rounds, base=stored.base, session_id=stored.id)
        first = stored.rounds[0]
        return {**self._page(state, stored.critique, request), self.ui.prompt: first.prompt, self.ui.seed: first.seed}

    def _page(self, state: StudioState, critique: str, request: gr.Request) -> dict:
        ui = self.ui
        update = {**ui._state_views(state), **ui._button_updates(state, busy=False)}
        update[ui.critique] = gr.update(value=critique, label=update[ui.critique]["label"])
        update[ui.mllm_critique] = critique  # the MLLM's own text: an untouched restore is no edit
        return update

    def _tab_busy(self, request: gr.Request) -> bool:
        """A job runs in this tab: its next update would overwrite a restored page."""
        if (getattr(request, "session_hash", None) or "default") in self.busy:
            gr.Warning("A round is being made in this tab: restore or delete a session once it ends (or Stop it).")
            return True
        return False

    def _failed(self, browser: Any, what: str) -> None:
        logger.exception("history: %s failed", what)
        key = browser if isinstance(browser, str) else ""
        if key not in self._warned:
            self._warned.add(key)
            gr.Warning(STORE_FAILED)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1].rstrip() + "…"
