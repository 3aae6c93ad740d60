"""IMG Studio's Gradio front end: `build_demo(session)` returns the gr.Blocks for one IMGSession.

Layering: `app.py` (flags) -> `ui` (layout, events, per-browser state) -> `img_core` (models).
Importing this package builds nothing and loads no model.
"""

from ui import gpu  # noqa: F401  (first: `spaces` must be imported before torch on ZeroGPU)
from ui.layout import build_demo, launch_kwargs

__all__ = ["build_demo", "launch_kwargs"]
