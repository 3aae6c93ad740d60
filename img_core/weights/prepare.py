"""Make a preset ready on a fresh machine: fetch what it needs from the hub and convert the IMG LLaVA once.

The real presets' MLLM, `img-llava-13b`, ships only in the original LLaVA code-base layout (REFERENCE §5).
`prepare(preset)` turns a machine with a GPU and internet into one that runs the preset:

    1. the small files of `shi-labs/IMG` `llava/` (config, tokenizer, shard index)      -> a staging folder
    2. free disk space check (sizes from the hub's file metadata, the shard index, or an estimate)
    3. the CLIP vision tower (config + processor; weights unless the checkpoint has a tuned tower)
    4. shard by shard: download one original shard, convert it, delete it               -> `.<target>.partial`
    5. completion marker, rename to the target in the cache (`~/.cache/img-studio/img-llava-13b-hf`)
    6. the preset's aligner file (and the release's `resampler.pth` for SDXL)           -> the HF cache

Everything downloaded goes through ONE function, `_download_snapshot`, so tests can point it at a local
folder that stands in for the hub (the code after the download call is the same). A preparation that is
killed resumes from the shards already converted (`img_core.weights.convert_llava` keeps a journal); the target
folder only ever appears complete, and `check_prepared_folder` (called by the MLLM loader) refuses a
converted folder without the completion marker or with files whose sizes changed since.

Progress goes to a callback `progress(stage, done, total, unit)`, e.g. ("downloading IMG LLaVA", 7.1, 26,
"GB") or ("converting shard", 2, 3, None), and to tqdm bars in the terminal.

    python -m img_core prepare --preset sdxl [--all] [--mllm HUB_ID_OR_DIR] [--keep-original]

`--all` also fetches the diffusion side (`diffusion_downloads`: pipeline or UNet, IP-Adapter, encoders).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from img_core.errors import IMGError, InvalidInputError, WeightsNotFoundError
from img_core.hub import weights_not_found
from img_core.mllm.converted import (
    JOURNAL,
    check_prepared_folder,
    is_prepared,
    partial_folder,
    prepared_folder,
)
from img_core.mllm.specs import (
    KNOWN_MLLMS,
    MLLMSpec,
    missing_weights_error,
    resolve_spec,
    spec_from_folder,
)
from img_core.paths import CACHE_ENV
from img_core.presets import IMG_HUB_REPO, PRESETS, Preset, get_preset
from img_core.resampler import RESAMPLER_FILENAME
from img_core.weights.convert_llava import (
    conversion_lock_path,
    convert_llava_checkpoint,
    exclusive_lock,
    remove_stale_copies,
    source_shard_names,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float, float, str | None], None]  # (stage, done, total, unit)

GB = 1e9  # progress and messages count decimal gigabytes, as the hub shows file sizes
DISK_MARGIN_BYTES = int(1 * GB)  # kept free on top of what preparation writes


@dataclass(frozen=True)
class ReleaseMLLM:
    """An MLLM that the release ships in the original LLaVA layout, and how to convert it."""

    repo: str
    subfolder: str  # the original-layout folder inside `repo`
    vision_tower: str  # the CLIP tower named by its `mm_vision_tower`
    chat_template: str
    estimated_bytes: float  # used only when neither the hub nor the shard index gives the size


# Estimates (not measurements): LLaVA-1.5-13B 13.35 B parameters in fp16; CLIP ViT-L/14-336 fp32 weights.
RELEASE_MLLMS: dict[str, ReleaseMLLM] = {
    "img-llava-13b": ReleaseMLLM(
        repo=IMG_HUB_REPO,
        subfolder="llava",
        vision_tower="openai/clip-vit-large-patch14-336",
        chat_template="llava-v0",  # the release's folder is named `llava`: conv_llava_v0
        estimated_bytes=26.7 * GB,
    ),
}
ESTIMATED_FILE_BYTES = {  # estimates for the hub files below when the hub's metadata cannot be read
    "vision_tower": 1.8 * GB,
    "aligner_sdxl.pth": 0.8 * GB,  # 195 M fp32 parameters
    "aligner_flux.pth": 2.7 * GB,  # 675 M fp32 parameters
    RESAMPLER_FILENAME: 0.2 * GB,
}
# `prepare --all`: the diffusion side's downloads when the hub cannot say their sizes (estimates from the
# parameter counts in the README memory table: fp16 SDXL, bf16 FLUX, fp32 image encoders).
ESTIMATED_REPO_BYTES = {
    "stabilityai/stable-diffusion-xl-base-1.0": 6.9 * GB,  # fp16 variant: UNet 5.1, text encoders 1.6, VAE 0.2
    "mhdang/dpo-sdxl-text2image-v1": 10.3 * GB,  # unet/ in fp32
    "black-forest-labs/FLUX.1-dev": 33.7 * GB,  # transformer 23.8, T5-XXL 9.5, CLIP-L and VAE 0.4
    "h94/IP-Adapter": 3.4 * GB,  # ip-adapter-plus_sdxl_vit-h 0.8 + ViT-H image encoder (fp32) 2.5
    "XLabs-AI/flux-ip-adapter": 1.0 * GB,
    "openai/clip-vit-large-patch14": 1.7 * GB,
}
SDXL_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae")
FLUX_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
TOWER_CONFIG_FILES = ["config.json", "preprocessor_config.json"]
TOWER_WEIGHT_FILES = ["model.safetensors", "pytorch_model.bin"]  # the first one the repo has is fetched


class NotEnoughDiskError(IMGError, OSError):
    """Preparation needs more free disk space than there is."""


@dataclass(frozen=True)
class HubDownload:
    """Files of one hub repo that a preset loads (`prepare --all` fetches them into the HF cache)."""

    what: str
    repo: str
    patterns: tuple[str, ...]


def diffusion_downloads(preset: Preset) -> list[HubDownload]:
    """The hub files of `preset`'s diffusion side, as its backend loads them (img_core/backends): the
    pipeline's components (the fp16 variant where the preset has one; not the UNet a `unet_id` replaces),
    that UNet, the IP-Adapter weights and its image encoder. Nothing else of those repos (no single-file
    checkpoints, no other variants)."""
    components = SDXL_COMPONENTS if preset.family == "sdxl" else FLUX_COMPONENTS
    weights = f"*.{preset.variant}.safetensors" if preset.variant else "*.safetensors"
    pipeline = ["model_index.json"]
    for component in components:
        if component == "unet" and preset.unet_id:
            continue
        pipeline += [f"{component}/*.json", f"{component}/*.txt", f"{component}/*.model", f"{component}/{weights}"]
    downloads = [HubDownload(f"{preset.family} pipeline", preset.pipeline_id, tuple(pipeline))]
    if preset.unet_id:
        downloads.append(HubDownload("UNet", preset.unet_id, ("unet/*.json", "unet/*.safetensors")))
    ip = preset.ip_adapter
    ip_weights = f"{ip.subfolder}/{ip.weight_name}" if ip.subfolder else ip.weight_name
    if preset.family == "sdxl":  # h94 layout: the image encoder is a folder of the IP-Adapter repo
        encoder = ip.image_encoder
        downloads.append(HubDownload("IP-Adapter + image encoder", ip.repo,
                                     (ip_weights, f"{encoder}/config.json", f"{encoder}/model.safetensors")))
    else:  # XLabs layout: the image encoder is a repo of its own
        downloads.append(HubDownload("IP-Adapter", ip.repo, (ip_weights,)))
        downloads.append(HubDownload("image encoder", ip.image_encoder,
                                     ("config.json", "preprocessor_config.json", "model.safetensors")))
    return downloads


def download_bytes(download: HubDownload, sizes: dict[str, int] | None) -> tuple[float, bool]:
    """(bytes, measured): the matching files' sizes from the hub's metadata, else the repo's estimate."""
    from fnmatch import fnmatch

    if sizes:
        matching = [size for path, size in sizes.items() if any(fnmatch(path, p) for p in download.patterns)]
        if matching:
            return float(sum(matching)), True
    return ESTIMATED_REPO_BYTES.get(download.repo, 0.0), False


@dataclass
class PrepareReport:
    """What `prepare` fetched and where the preset's models now are."""

    preset: str
    mllm_folder: Path | None = None  # a converted / downloaded MLLM folder (None: loads from the hub itself)
    fetched: list[tuple[str, str]] = field(default_factory=list)  # (what, where)
    kept_original: Path | None = None

    def lines(self) -> list[str]:
        lines = [f"{what}: {where}" for what, where in self.fetched]
        if self.mllm_folder:
            lines.append(f"MLLM ready: {self.mllm_folder}")
        if self.kept_original:
            lines.append(f"original layout kept: {self.kept_original}")
        return lines or [f"preset {self.preset}: nothing to prepare"]


# ----------------------------------------------------------------------------------- the download call


def _download_snapshot(repo: str, patterns: list[str] | None, local_dir: Path | None) -> Path:
    """Download the files of hub repo `repo` matching `patterns` (all if None) into `local_dir`, or into
    the Hugging Face cache (HF_HOME) when None; return the folder that holds them in the repo's layout.

    The only place that talks to the hub for downloads: tests replace it with a local stand-in."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, allow_patterns=patterns, local_dir=local_dir))


def _hub_file_sizes(repo: str) -> dict[str, int] | None:
    """{path in repo: bytes} from the hub's file metadata, or None when the hub cannot be asked."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo, files_metadata=True)
    except Exception as error:  # noqa: BLE001 - offline, gated, network: sizes fall back to estimates
        logger.info("no file metadata for %s (%s): sizes are estimates", repo, type(error).__name__)
        return None
    return {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or []}


# ------------------------------------------------------------------------------------- where things go


def prepared_spec(mllm_name: str, folder: str | Path) -> MLLMSpec:
    """The spec to load a prepared `folder` with: a known MLLM keeps its name and settings, anything else
    is read from the folder."""
    if mllm_name in KNOWN_MLLMS:
        return replace(KNOWN_MLLMS[mllm_name], model_id=str(folder))
    return spec_from_folder(folder)


# ----------------------------------------------------------------------------------------- disk space


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(folder: Path, need_bytes: float, free_bytes: int | None = None, what: str = "") -> None:
    """Raise NotEnoughDiskError when `folder`'s file system has less than `need_bytes` + a margin free.

    `free_bytes` replaces the measured free space (a parameter for tests and dry runs)."""
    free = free_disk_bytes(folder) if free_bytes is None else free_bytes
    need = need_bytes + DISK_MARGIN_BYTES
    if free < need:
        raise NotEnoughDiskError(
            f"{what or 'preparation'} needs about {need / GB:.1f} GB free in {folder} "
            f"(including {DISK_MARGIN_BYTES / GB:.0f} GB of margin) but only {free / GB:.1f} GB are free: free "
            f"some space, or point {CACHE_ENV} (converted models) / HF_HOME (downloads) at a larger disk"
        )


def conversion_disk_need(shard_bytes: dict[str, float], done: set[str], keep_original: bool) -> float:
    """Peak extra disk of converting the shards not `done`: the converted output, plus the original
    shards (all of them if kept, else the largest one: each is deleted once converted)."""
    remaining = [size for name, size in shard_bytes.items() if name not in done]
    if not remaining:
        return 0.0
    originals = sum(remaining) if keep_original else max(remaining)
    return sum(remaining) + originals


# ------------------------------------------------------------------------------------------- progress


class ProgressReporter:
    """Fans progress out to the caller's callback and to one tqdm bar per stage (stderr)."""

    def __init__(self, callback: ProgressCallback | None, show_bars: bool = True):
        self.callback = callback
        self.show_bars = show_bars
        self.bars: dict[str, object] = {}
        self._lock = threading.Lock()

    def __call__(self, stage: str, done: float, total: float, unit: str | None = None) -> None:
        with self._lock:
            if self.show_bars:
                from tqdm.auto import tqdm

                if stage not in self.bars:
                    self.bars[stage] = tqdm(total=round(total, 1), desc=stage, unit=unit or "step", file=sys.stderr)
                bar = self.bars[stage]
                bar.n = round(done, 1)
                bar.refresh()
            if self.callback is not None:
                self.callback(stage, done, total, unit)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def format_progress(stage: str, done: float, total: float, unit: str | None = None) -> str:
    """One status line: "downloading IMG LLaVA 7.1/26.0 GB", "converting shard 2/3"."""
    if unit:
        return f"{stage} {done:.1f}/{total:.1f} {unit}"
    return f"{stage} {int(done)}/{int(total)}"


@contextmanager
def _watch_download(folder: Path, report: Callable[[float], None], interval_s: float = 1.0) -> Iterator[None]:
    """While the body downloads into `folder`, call `report(bytes added so far)` every `interval_s`."""
    start = _folder_bytes(folder)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            report(_folder_bytes(folder) - start)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (partial downloads included)."""
    if not folder.exists():
        return 0
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:  # a temporary file renamed while walking
            pass
    return total


# ------------------------------------------------------------------------------------------ preparing


def prepare(
    preset: str | Preset,
    mllm: str | None = None,
    cache_dir: str | Path | None = None,
    keep_original: bool = False,
    with_aligner: bool = True,
    vision_tower: str | Path | None = None,
    free_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    show_progress_bars: bool = True,
    everything: bool = False,
) -> PrepareReport:
    """Make `preset` ready to load: convert its release MLLM into the cache if it is not there, fetch
    its aligner (and the SDXL release Resampler) into the Hugging Face cache; with `everything` also the
    diffusion side (`diffusion_downloads`), so the machine can then run the preset offline.

    `mllm` overrides the preset's MLLM: a known name, a local converted folder (checked), or the hub id of
    an already converted copy (downloaded as is). `vision_tower` overrides the release MLLM's CLIP tower
    (hub id or local folder). `free_bytes` replaces the measured free disk space. Raises
    WeightsNotFoundError when offline with nothing cached, NotEnoughDiskError when the disk is too small."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    report = PrepareReport(preset=preset.name)
    if preset.is_tiny:
        return report  # tiny presets are built locally by img_core.tiny.models
    reporter = ProgressReporter(progress, show_progress_bars)
    try:
        report.mllm_folder = _prepare_mllm(
            mllm or preset.mllm, cache_dir, keep_original, vision_tower, free_bytes, reporter, report
        )
        if with_aligner or everything:
            _fetch_aligner(preset, free_bytes, reporter, report)
        if everything:
            _fetch_diffusion(preset, free_bytes, reporter, report)
    finally:
        reporter.close()
    return report


def ensure_prepared(
    preset_or_mllm_name: str, progress: ProgressCallback | None = None, cache_dir: str | Path | None = None
) -> Path | None:
    """The local folder to load the MLLM from, preparing it first if needed; None when the MLLM needs no
    preparation (hub ids the loader downloads itself, tiny models).

    Takes a preset name (its MLLM), a known MLLM name, a local folder or the hub id of a converted copy.
    Fast when already prepared (checks the completion marker; no network)."""
    name = PRESETS[preset_or_mllm_name].mllm if preset_or_mllm_name in PRESETS else preset_or_mllm_name
    reporter = ProgressReporter(progress, show_bars=True)
    try:
        return _prepare_mllm(name, cache_dir, False, None, None, reporter, PrepareReport(preset=name))
    finally:
        reporter.close()


def resolve_prepared_spec(
    mllm_name: str, tiny_root: Path | None = None, progress: ProgressCallback | None = None
) -> MLLMSpec:
    """`resolve_spec`, preparing the MLLM first where it needs it (what a session calls on first load)."""
    folder = ensure_prepared(mllm_name, progress)
    if folder is None:
        return resolve_spec(mllm_name, tiny_root)
    return prepared_spec(mllm_name, folder)


def _prepare_mllm(
    name: str,
    cache_dir: str | Path | None,
    keep_original: bool,
    vision_tower: str | Path | None,
    free_bytes: int | None,
    reporter: ProgressReporter,
    report: PrepareReport,
) -> Path | None:
    """Dispatch on what `name` is; see `ensure_prepared`."""
    if name in RELEASE_MLLMS:
        return _prepare_release_mllm(name, cache_dir, keep_original, vision_tower, free_bytes, reporter, report)
    if name in KNOWN_MLLMS:
        return None  # a hub id from_pretrained fetches itself, or a tiny model
    folder = Path(name).expanduser()
    if folder.is_dir():
        check_prepared_folder(folder)
        return folder
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise InvalidInputError(f"unknown MLLM {name!r}: use one of {sorted(KNOWN_MLLMS)}, a folder or a hub id")
    # the hub id of a converted copy (convert-llava --push-to-hub): download it whole
    sizes = _hub_file_sizes(name)
    if sizes is not None:
        check_free_space(_hf_cache_dir(), sum(sizes.values()), free_bytes, f"downloading {name}")
    folder = _fetch(name, None, None, f"downloading {name}", sizes, reporter)
    check_prepared_folder(folder)
    report.fetched.append((f"converted MLLM {name}", str(folder)))
    return folder


def _prepare_release_mllm(
    name: str,
    cache_dir: str | Path | None,
    keep_original: bool,
    vision_tower: str | Path | None,
    free_bytes: int | None,
    reporter: ProgressReporter,
    report: PrepareReport,
) -> Path:
    """Download the original layout shard by shard and convert it into the cache (see the module doc),
    one process at a time."""
    release = RELEASE_MLLMS[name]
    target = prepared_folder(name, cache_dir)
    spec = replace(KNOWN_MLLMS[name], model_id=str(target))  # for the "not found" message
    if is_prepared(target):
        remove_stale_copies(target)
        return target
    with exclusive_lock(conversion_lock_path(target)):
        if is_prepared(target):  # another process finished it while this one waited
            remove_stale_copies(target)
            return target
        return _convert_release_mllm(name, release, target, spec, keep_original, vision_tower, free_bytes,
                                     reporter, report)


def _convert_release_mllm(
    name: str,
    release: ReleaseMLLM,
    target: Path,
    spec: MLLMSpec,
    keep_original: bool,
    vision_tower: str | Path | None,
    free_bytes: int | None,
    reporter: ProgressReporter,
    report: PrepareReport,
) -> Path:
    """Steps 1-5 of the module doc for `name`, into `target` (the caller holds the target's lock)."""

    if target.exists():
        logger.warning("%s is incomplete (no completion marker): converting again; it is replaced when done", target)
    staging = target.with_name(target.name.removesuffix("-hf") + "-original")
    stage = f"downloading {'IMG LLaVA' if release.repo == IMG_HUB_REPO else name}"

    # 1. the small files of the original layout: config, tokenizer, shard index
    sub = release.subfolder
    small = [f"{sub}/*.json", f"{sub}/*.model", f"{sub}/*.txt"]
    source = _fetch(release.repo, small, staging, None, None, None, spec) / sub

    # 2. shard sizes: hub metadata, else the index's total, else the estimate; then the disk check
    sizes = _hub_file_sizes(release.repo)
    shard_names = _shard_names(source, sizes, sub)
    shard_bytes = _shard_bytes(source, sizes, sub, shard_names, release.estimated_bytes)
    fetched_all = shard_names is None
    if fetched_all:  # no index and no listing: fetch every weight file now, then name them
        check_free_space(target.parent, 2 * release.estimated_bytes, free_bytes, f"converting {name}")
        with _watch_download(staging, lambda added: reporter(stage, added / GB, release.estimated_bytes / GB, "GB")):
            _fetch(release.repo, [f"{sub}/*.safetensors", f"{sub}/*.bin"], staging, None, None, None, spec)
        shard_names = source_shard_names(source)
        shard_bytes = {shard: float((source / shard).stat().st_size) for shard in shard_names}
    journal_path = partial_folder(target) / JOURNAL
    done = set(json.loads(journal_path.read_text()).get("done", [])) if journal_path.is_file() else set()
    need = conversion_disk_need(shard_bytes, done, keep_original)
    check_free_space(target.parent, need, free_bytes, f"converting {name}")

    # 3. the CLIP vision tower: config and processor; weights only where the checkpoint has no tuned tower
    original_config = json.loads((source / "config.json").read_text())
    tower = vision_tower or release.vision_tower
    if not Path(str(tower)).expanduser().is_dir():
        tower_sizes = _hub_file_sizes(str(tower))
        patterns = list(TOWER_CONFIG_FILES)
        if not original_config.get("unfreeze_mm_vision_tower"):
            available = [f for f in TOWER_WEIGHT_FILES if tower_sizes is None or f in tower_sizes]
            patterns += available[:1] if tower_sizes is not None else TOWER_WEIGHT_FILES
        tower_need = sum((tower_sizes or {}).get(p, 0) for p in patterns) or ESTIMATED_FILE_BYTES["vision_tower"]
        check_free_space(_hf_cache_dir(), tower_need, free_bytes, f"downloading {tower}")
        tower = _fetch(str(tower), patterns, None, f"downloading vision tower {tower}", tower_sizes, reporter)
        report.fetched.append(("vision tower", str(tower)))

    # 4. shard by shard: download, convert, delete the original (unless kept)
    total_gb = sum(shard_bytes.values()) / GB
    fetched_gb = sum(size for shard, size in shard_bytes.items() if shard in done) / GB

    def fetch_shard(shard: str) -> None:
        nonlocal fetched_gb
        size_gb = shard_bytes[shard] / GB
        with _watch_download(staging, lambda added: reporter(stage, min(fetched_gb + added / GB, total_gb),
                                                              total_gb, "GB")):
            _fetch(release.repo, [f"{sub}/{shard}"], staging, None, None, None, spec)
        fetched_gb += size_gb
        reporter(stage, min(fetched_gb, total_gb), total_gb, "GB")

    reporter(stage, fetched_gb, total_gb, "GB")
    convert_llava_checkpoint(
        source,
        target,
        vision_tower=tower,
        chat_template=release.chat_template,
        delete_source_shards=not keep_original,
        shard_names=shard_names,
        fetch_shard=None if fetched_all else fetch_shard,
        progress=reporter,
    )
    report.fetched.append((f"{release.repo} {sub}/ converted", str(target)))
    if keep_original:
        report.kept_original = source
    else:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _fetch_aligner(preset: Preset, free_bytes: int | None, reporter: ProgressReporter, report: PrepareReport) -> None:
    """The preset's official aligner file, plus the release Resampler for SDXL, into the HF cache."""
    aligner = preset.aligner
    if not aligner.filename or aligner.repo != IMG_HUB_REPO:
        return
    files = [aligner.filename] + ([RESAMPLER_FILENAME] if preset.family == "sdxl" else [])  # the SDXL demo's
    sizes = _hub_file_sizes(aligner.repo)
    need = sum((sizes or {}).get(f, 0) or ESTIMATED_FILE_BYTES.get(f, 0) for f in files)
    check_free_space(_hf_cache_dir(), need, free_bytes, f"downloading {', '.join(files)}")
    folder = _fetch(aligner.repo, files, None, "downloading aligner", sizes, reporter)
    for name in files:
        report.fetched.append((name, str(folder / name)))


def _fetch_diffusion(
    preset: Preset, free_bytes: int | None, reporter: ProgressReporter, report: PrepareReport
) -> None:
    """Every `diffusion_downloads` file into the HF cache: sizes first (one disk check for all), then each
    repo with a progress bar in GB."""
    downloads = diffusion_downloads(preset)
    planned = [(download, *download_bytes(download, _hub_file_sizes(download.repo))) for download in downloads]
    check_free_space(_hf_cache_dir(), sum(size for _, size, _ in planned), free_bytes,
                     f"downloading the {preset.name} diffusion models")
    for download, size, measured in planned:
        stage = f"downloading {download.what} {download.repo}"
        repo_cache = _hf_cache_dir() / f"models--{download.repo.replace('/', '--')}"
        with _watch_download(repo_cache, lambda added: reporter(stage, added / GB, size / GB, "GB")):
            folder = _fetch(download.repo, list(download.patterns), None, None, None, None)
        reporter(stage, size / GB, size / GB, "GB")
        shown = f"{size / GB:.1f} GB" + ("" if measured else " estimated")
        report.fetched.append((f"{download.what} {download.repo} ({shown})", str(folder)))


def _fetch(
    repo: str,
    patterns: list[str] | None,
    local_dir: Path | None,
    stage: str | None,
    sizes: dict[str, int] | None,
    reporter: ProgressReporter | None,
    spec: MLLMSpec | None = None,
) -> Path:
    """`_download_snapshot` with progress and one clear error when the files cannot be had (the MLLM's
    own message and hint when `spec` is given)."""
    try:
        folder = _download_snapshot(repo, patterns, local_dir)
    except Exception as error:  # noqa: BLE001 - offline, missing, gated, network: all mean "not here"
        reason = (str(error).splitlines() or [""])[0][:160]
        detail = f"cannot download {repo} {' '.join(patterns or [])}: {type(error).__name__}: {reason}"
        if spec is not None:
            raise missing_weights_error(spec, detail) from error

        raise weights_not_found(repo, detail) from error
    if stage and reporter is not None:
        total = sum(sizes.values()) / GB if sizes else 0.0
        reporter(stage, total, total, "GB")
    return folder


def _shard_names(source: Path, sizes: dict[str, int] | None, sub: str) -> list[str] | None:
    """Weight shard names from the index, else from the hub's listing; None when neither says."""

    try:
        return source_shard_names(source)
    except WeightsNotFoundError:
        pass
    if sizes:
        listed = [path.removeprefix(f"{sub}/") for path in sizes if path.startswith(f"{sub}/")]
        weights = sorted(n for n in listed if n.startswith("model") and n.endswith(".safetensors")) or sorted(
            n for n in listed if n.startswith("pytorch_model") and n.endswith(".bin")
        )
        return weights or None
    return None


def _shard_bytes(
    source: Path, sizes: dict[str, int] | None, sub: str, shard_names: list[str] | None, estimate: float
) -> dict[str, float]:
    """{shard: bytes}: from the hub's metadata, else the index's total_size split evenly, else the estimate."""
    names = shard_names or ["(weights)"]
    if sizes and all(f"{sub}/{name}" in sizes for name in names):
        return {name: float(sizes[f"{sub}/{name}"]) for name in names}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = source / index_name
        if index.is_file():
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
            if total:
                return {name: float(total) / len(names) for name in names}
    return {name: estimate / len(names) for name in names}


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
