"""Hub access that fails with one clear message when weights are not on this machine.

Everything that can come from the Hugging Face hub goes through `download_file` or is wrapped with
`weights_not_found`, so an offline machine (HF_HUB_OFFLINE=1, or no network) gets an error naming the
id and saying how to fetch it, instead of a stack of retries and a traceback.
"""

from __future__ import annotations

from pathlib import Path

from img_core.errors import WeightsNotFoundError


def weights_not_found(model_id: str, detail: str = "", filename: str | None = None) -> WeightsNotFoundError:
    """The error for weights that are neither a local folder nor in the hub cache."""
    what = f"{model_id}/{filename}" if filename else model_id
    hint = f"hf download {model_id}" + (f" {filename}" if filename else "")
    return WeightsNotFoundError(
        f"weights {what!r} are not on this machine and could not be downloaded"
        + (f" ({detail.strip().splitlines()[0][:200]})" if detail.strip() else "")
        + f". On a machine with internet run `{hint}` (log in first for gated models such as FLUX.1-dev), "
        "then copy the Hugging Face cache (HF_HOME) here, or pass a local folder instead of the id."
    )


def download_file(
    repo_id: str, filename: str, subfolder: str | None = None, revision: str | None = None
) -> Path:
    """A file from a local folder `repo_id` or from the hub (cache first). Raises WeightsNotFoundError."""
    local = Path(repo_id) / (subfolder or "") / filename
    if local.is_file():
        return local
    if Path(repo_id).is_dir():
        raise weights_not_found(repo_id, f"{local} does not exist", filename)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder or None, revision=revision))
    except Exception as error:  # noqa: BLE001 - offline, missing, gated, network: all mean "not here"
        raise weights_not_found(repo_id, f"{type(error).__name__}: {error}", filename) from error


def is_missing_weights_error(error: BaseException) -> bool:
    """True for the errors from_pretrained raises when a model id is not local and cannot be fetched."""
    if isinstance(error, (OSError, FileNotFoundError, ValueError)):
        text = str(error).lower()
        markers = ("does not appear to have", "couldn't connect", "cannot find", "not a local folder",
                   "offline", "no such file", "is not a valid model identifier", "we couldn't", "not found",
                   "can't load")
        return any(marker in text for marker in markers)
    return type(error).__name__ in {"LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError",
                                    "OfflineModeIsEnabled", "EntryNotFoundError"}


def from_pretrained_or_explain(cls, model_id: str, **kwargs):
    """`cls.from_pretrained(model_id, **kwargs)`, turning "not here and not downloadable" into
    WeightsNotFoundError that names `model_id`."""
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised unless it means missing weights
        if is_missing_weights_error(error):
            raise weights_not_found(model_id, f"{type(error).__name__}: {error}") from error
        raise


def call_or_explain(model_id: str, function, *args, **kwargs):
    """Run a loader such as `pipeline.load_ip_adapter(...)` with the same error translation."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        if is_missing_weights_error(error):
            raise weights_not_found(model_id, f"{type(error).__name__}: {error}") from error
        raise
