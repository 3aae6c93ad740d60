"""How the page looks and the little JavaScript it runs: CSS, the theme (WCAG AA contrast, checked by
axe-core in tests/test_app_studio_browser.py), the scroll to the newest round, the mending of Gradio's own
widgets for screen readers, and the Download click. `ui.layout` passes them to Gradio."""

import json

import gradio as gr

from ui.views import REBASE_DURING_A_JOB

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
.gradio-container { overflow: clip visible !important; }  /* hidden would make a scroll box: sticky needs clip */
#status-bar { position: sticky; top: 0; z-index: 50; flex-wrap: nowrap; align-items: center; gap: 8px;
  padding: 4px 8px; background: var(--background-fill-primary); border-bottom: 1px solid var(--border-color-primary); }
#status-bar > #status { flex: 1 1 auto; min-width: 0; }
#status p { margin: 0; }
@media (max-width: 640px) { #status { font-size: 0.85em; line-height: 1.25; } }
#round-strip > .round-card { scroll-margin-top: 88px; }
.toast-title, .toast-message-text { color: var(--body-text-color) !important; }  /* contrast (axe-core) */
"""

# Runs once the page loads. (1) Brings the newest round card into view whenever a new one appears (after
# each round, on any screen), again shortly after, once its image has its height. (2) Mends what axe-core
# finds in Gradio's own widgets: the image's click-to-enlarge button has no name, an empty image is a
# labelled div without a role, the upload area's name differs from its visible text, a History
# thumbnail is named "Thumbnail 1 of 2" while it shows its caption (its name becomes the caption; Gradio
# sets that name again, an attribute change only, when the list grows: hence aria-label is observed too),
# and a message's header is a button holding the Close button. (3) Disables "Refine from here" while this
# tab's job runs or waits (the server refuses it then too, with REBASE_DURING_A_JOB).
PAGE_JS = """() => {
  const REBASE_DURING_A_JOB = REBASE_MESSAGE;
  const mendGradioWidgets = () => {
    document.querySelectorAll(".image-container > button:not([aria-label])")
      .forEach((button) => button.setAttribute("aria-label", "Show the image larger"));
    document.querySelectorAll(".empty[aria-label]:not([role])").forEach((box) => box.setAttribute("role", "img"));
    document.querySelectorAll(".upload-container[aria-label]").forEach((button) => {
      const text = button.innerText.replace(/\\s+/g, " ").trim();
      if (text && button.getAttribute("aria-label") !== text) button.setAttribute("aria-label", text);
    });
    document.querySelectorAll("#history-gallery .thumbnail-item[aria-label]").forEach((item) => {
      const caption = item.querySelector(".caption-label");
      const text = caption ? caption.textContent.replace(/\\s+/g, " ").trim() : "";
      if (text && item.getAttribute("aria-label") !== text) item.setAttribute("aria-label", text);
    });
    document.querySelectorAll(".toast-header[role=button]").forEach((header) => {
      header.removeAttribute("role");
      header.removeAttribute("tabindex");
    });
  };
  // (3) While a job of this tab runs or waits (Stop is enabled), "Refine from here" is disabled, and says
  // why: the job's result would override the choice. Only the buttons disabled here are enabled again.
  const holdRebaseDuringAJob = () => {
    const stop = document.querySelector("#stop-btn");
    const busy = Boolean(stop && !stop.disabled);
    document.querySelectorAll("button[id^='refine-from-']").forEach((button) => {
      if (busy && !button.disabled) {
        button.disabled = true;
        button.dataset.heldByJob = "1";
        button.title = REBASE_DURING_A_JOB;
      } else if (!busy && button.dataset.heldByJob) {
        button.disabled = false;
        delete button.dataset.heldByJob;
        button.removeAttribute("title");
      }
    });
  };
  mendGradioWidgets();
  holdRebaseDuringAJob();
  let newest = null;
  const show = (card) => {
    const box = card.getBoundingClientRect();
    const strip = card.parentElement.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight || box.left < strip.left || box.right > strip.right) {
      card.scrollIntoView({block: "nearest", inline: "nearest"});
    }
  };
  new MutationObserver(() => {
    mendGradioWidgets();
    holdRebaseDuringAJob();
    const cards = document.querySelectorAll("#round-strip > .round-card");
    const last = cards.length ? cards[cards.length - 1] : null;
    if (!last || last.id === newest) { newest = last ? newest : null; return; }
    newest = last.id;
    [0, 300, 1000].forEach((ms) => setTimeout(() => last.isConnected && show(last), ms));
  }).observe(document.body, {childList: true, subtree: true, attributes: true,
                             attributeFilter: ["aria-label", "disabled"]});
}""".replace("REBASE_MESSAGE", json.dumps(REBASE_DURING_A_JOB))

# Downloads the zip that Download just wrote into the hidden file component (a DownloadButton would offer
# the file it held before the click).
DOWNLOAD_JS = """(file) => {
  if (!file || !file.url) return;
  const link = document.createElement("a");
  link.href = file.url;
  link.download = file.orig_name || "img-studio-session.zip";
  document.body.appendChild(link);
  link.click();
  link.remove();
}"""

def theme() -> gr.themes.Base:
    """Gradio's Soft theme with text dark enough for WCAG AA contrast (4.5:1; axe-core checks it): labels,
    info lines, the footer and the primary buttons."""
    return gr.themes.Soft().set(
        block_label_text_color="*primary_800",
        block_title_text_color="*primary_800",
        block_info_text_color="*neutral_600",
        body_text_color_subdued="*neutral_600",
        button_primary_background_fill="*primary_700",
        button_primary_background_fill_hover="*primary_800",
        checkbox_label_background_fill_selected="*primary_700",
    )
