"""IMG Studio core library: Implicit Multimodal Guidance (ICCV 2025) re-generation rounds.

Import submodules directly (`img_core.session`, `img_core.aligner`, ...); importing this package loads
no model and no heavy dependency.
"""

__version__ = "0.1.0"
