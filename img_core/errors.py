"""Errors that reach users. Their messages are shown as they are (CLI stderr, Gradio error boxes), so
each one says what was wrong and what to do about it."""


class IMGError(Exception):
    """Base class: a problem the user can act on. The message is user-facing."""


class InvalidInputError(IMGError, ValueError):
    """A prompt, image or setting the user gave is unusable."""


class WeightsNotFoundError(IMGError, FileNotFoundError):
    """Model weights are not on this machine and cannot be downloaded (offline or missing)."""


class IncompatibleAlignerError(IMGError, ValueError):
    """The aligner was trained for another diffusion family or MLLM than the one loaded."""


class OutOfMemoryError(IMGError, RuntimeError):
    """The accelerator ran out of memory; the message says what to lower."""


class CorruptFileError(IMGError, ValueError):
    """A file on disk is damaged (checksum mismatch, truncated, unreadable) or holds non-finite numbers;
    the message names the file and what is wrong in it."""
