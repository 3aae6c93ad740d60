"""img_core.weights.prepare end to end on a stand-in hub: tiny original-layout LLaVA, tiny aligner, tiny CLIP tower.

The stand-in replaces the ONE download function, `prepare._download_snapshot`: it copies the files of a
local folder laid out like the hub repo that match the requested patterns into `local_dir` (or a folder
standing in for the Hugging Face cache), exactly what `snapshot_download` leaves on disk. Everything after
the download call (disk check, shard-by-shard conversion, marker, rename, clean-up) is the real code.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from fnmatch import fnmatch  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from img_core.cli.convert_llava import main as convert_llava_main  # noqa: E402
from img_core.cli.main import main as cli_main  # noqa: E402
from img_core.errors import WeightsNotFoundError  # noqa: E402
from img_core.mllm import MLLMCritic  # noqa: E402
from img_core.mllm.converted import (  # noqa: E402
    COMPLETION_MARKER,
    check_prepared_folder,
    is_prepared,
    partial_folder,
    prepared_folder,
)
from img_core.weights import prepare as prepare_module  # noqa: E402
from img_core.weights.prepare import (  # noqa: E402
    NotEnoughDiskError,
    conversion_disk_need,
    ensure_prepared,
    format_progress,
    prepare,
    prepared_spec,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_convert_llava import write_original_layout  # noqa: E402

IMG_REPO = "shi-labs/IMG"
TOWER_REPO = "openai/clip-vit-large-patch14-336"
SHARDS = 3


class StandInHub:
    """Local folders laid out like hub repos; `download` has `_download_snapshot`'s signature."""

    def __init__(self, repos: dict[str, Path], cache: Path):
        self.repos = repos
        self.cache = cache  # stands in for the Hugging Face cache (downloads without local_dir)
        self.calls: list[tuple[str, list[str] | None, Path | None]] = []

    def download(self, repo: str, patterns: list[str] | None, local_dir: Path | None) -> Path:
        self.calls.append((repo, patterns, local_dir))
        if repo not in self.repos:
            raise OSError(f"{repo} is not on the stand-in hub")
        destination = Path(local_dir) if local_dir else self.snapshot(repo)
        for path in sorted(self.repos[repo].rglob("*")):
            relative = path.relative_to(self.repos[repo]).as_posix()
            if path.is_file() and (patterns is None or any(fnmatch(relative, p) for p in patterns)):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                if not (destination / relative).exists():
                    shutil.copy2(path, destination / relative)
        return destination

    def snapshot(self, repo: str) -> Path:
        """Where a download without local_dir lands (the Hugging Face cache's layout)."""
        return self.cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "stand-in"

    def requested(self, repo: str) -> list[str]:
        return [p for r, patterns, _ in self.calls if r == repo for p in (patterns or ["*"])]


def build_stand_in_repos(root: Path) -> dict[str, Path]:
    """shi-labs/IMG (llava/ in 3 .bin shards, aligners, resampler, an image_encoder/ we must not fetch) and
    the CLIP tower repo. Returns {repo id: folder}."""
    from transformers import CLIPVisionModel

    from img_core.aligner import AlignerConfig, ImplicitAligner
    from img_core.tiny.mllm import tiny_clip_image_processor, tiny_clip_vision_config

    img, tower = root / "hub" / "shi-labs-IMG", root / "hub" / "clip"
    (img / "llava").mkdir(parents=True)
    write_original_layout(img / "llava", root / "reference-llama", shards=SHARDS)
    torch.manual_seed(0)
    aligner = ImplicitAligner(AlignerConfig(image_dim=32, guidance_dim=64, depth=1, heads=1, dim_head=64))
    torch.save(aligner.state_dict(), img / "aligner_sdxl.pth")
    torch.save({"latents": torch.zeros(1, 4, 8)}, img / "resampler.pth")
    (img / "aligner_flux.pth").write_bytes(b"not needed by sdxl")
    (img / "image_encoder").mkdir()
    (img / "image_encoder" / "config.json").write_text("{}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(tower)
    tiny_clip_image_processor().save_pretrained(tower)
    (tower / "tf_model.h5").write_bytes(b"not needed")
    return {IMG_REPO: img, TOWER_REPO: tower}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand-in")
    return {"root": root, "repos": build_stand_in_repos(root)}


@pytest.fixture
def hub(stand_in, tmp_path, monkeypatch):
    hub = StandInHub(stand_in["repos"], tmp_path / "hf-cache")
    monkeypatch.setattr(prepare_module, "_download_snapshot", hub.download)
    return hub


@pytest.fixture(scope="module")
def reference_logits(stand_in):
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(stand_in["root"] / "reference-llama").eval()
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        return input_ids, llama(input_ids=input_ids).logits  # (1, 6, V)


def assert_loads_with_reference_logits(folder: Path, reference_logits) -> None:
    critic = MLLMCritic.load(prepared_spec("img-llava-13b", folder))
    input_ids, expected = reference_logits
    with torch.no_grad():
        actual = critic.model(input_ids=input_ids).logits
    torch.testing.assert_close(actual[..., : expected.shape[-1]], expected, atol=1e-5, rtol=0)


def test_prepare_command_end_to_end(hub, tmp_path, reference_logits, capsys):
    events = []
    cache = tmp_path / "cache"

    exit_code = cli_main(["prepare", "--preset", "sdxl", "--cache-dir", str(cache), "--quiet"])
    assert exit_code == 0
    printed = capsys.readouterr().out
    target = cache / "img-llava-13b-hf"
    assert f"MLLM ready: {target}" in printed and "aligner_sdxl.pth" in printed and "resampler.pth" in printed

    # only the needed files, shards one at a time; the original layout is gone, no half folder is left
    assert hub.requested(IMG_REPO) == ["llava/*.json", "llava/*.model", "llava/*.txt"] + [
        f"llava/pytorch_model-{i:05d}-of-{SHARDS:05d}.bin" for i in range(1, SHARDS + 1)
    ] + ["aligner_sdxl.pth", "resampler.pth"]
    assert hub.requested(TOWER_REPO) == ["config.json", "preprocessor_config.json", "model.safetensors",
                                         "pytorch_model.bin"]  # offline: no listing, both weight names asked
    assert sorted(p.name for p in cache.iterdir()) == [".img-llava-13b-hf.lock", "img-llava-13b-hf"]
    assert is_prepared(target) and (target / COMPLETION_MARKER).is_file()
    assert not (hub.snapshot(IMG_REPO) / "image_encoder").exists()
    assert not (hub.snapshot(IMG_REPO) / "aligner_flux.pth").exists()
    assert not (hub.snapshot(TOWER_REPO) / "tf_model.h5").exists()
    assert_loads_with_reference_logits(target, reference_logits)
    from img_core.aligner import ImplicitAligner

    aligner = ImplicitAligner.from_official_checkpoint(hub.snapshot(IMG_REPO) / "aligner_sdxl.pth")
    assert aligner.config.guidance_dim == 64

    # prepared once: later calls find it without downloading anything
    calls = len(hub.calls)
    assert ensure_prepared("sdxl", progress=lambda *event: events.append(event), cache_dir=cache) == target
    assert len(hub.calls) == calls and events == []


def test_progress_reports_gigabytes_and_shards(hub, tmp_path, stand_in):
    events = []
    report = prepare("sdxl", cache_dir=tmp_path / "cache", with_aligner=False, show_progress_bars=False,
                     progress=lambda *event: events.append(event))
    assert report.kept_original is None
    index = json.loads((stand_in["repos"][IMG_REPO] / "llava" / "pytorch_model.bin.index.json").read_text())
    total_gb = index["metadata"]["total_size"] / 1e9
    downloads = [e for e in events if e[0] == "downloading IMG LLaVA"]
    assert downloads[0][1:] == (0.0, pytest.approx(total_gb), "GB")
    assert downloads[-1][1:] == (pytest.approx(total_gb), pytest.approx(total_gb), "GB")
    assert all(a[1] <= b[1] for a, b in zip(downloads, downloads[1:]))  # never goes backwards
    shards = [e for e in events if e[0] == "converting shard"]
    assert shards == [("converting shard", i, SHARDS + 1, None) for i in range(1, SHARDS + 2)]
    assert format_progress("downloading IMG LLaVA", 7.14, 26, "GB") == "downloading IMG LLaVA 7.1/26.0 GB"
    assert format_progress("converting shard", 2, 3) == "converting shard 2/3"


def test_keep_original_keeps_the_downloaded_layout(hub, tmp_path):
    report = prepare("sdxl", cache_dir=tmp_path / "cache", keep_original=True, with_aligner=False,
                     show_progress_bars=False)
    kept = report.kept_original
    assert kept == tmp_path / "cache" / "img-llava-13b-original" / "llava"
    assert sorted(p.name for p in kept.glob("*.bin")) == [
        f"pytorch_model-{i:05d}-of-{SHARDS:05d}.bin" for i in range(1, SHARDS + 1)
    ]


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_prepare import StandInHub
from img_core.weights import prepare as prepare_module
repos = {{k: Path(v) for k, v in {repos!r}.items()}}
hub = StandInHub(repos, Path({hf_cache!r}))
prepare_module._download_snapshot = hub.download

def progress(stage, done, total, unit):
    if stage == "converting shard" and done == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind runs

prepare_module.prepare("sdxl", cache_dir={cache!r}, with_aligner=False, show_progress_bars=False, progress=progress)
"""


def test_killed_midway_then_rerun_gives_a_complete_loadable_folder(hub, stand_in, tmp_path, reference_logits):
    cache = tmp_path / "cache"
    target = prepared_folder("img-llava-13b", cache)
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).resolve().parent),
        repos={k: str(v) for k, v in stand_in["repos"].items()},
        hf_cache=str(tmp_path / "hf-cache"),
        cache=str(cache),
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]

    # the half conversion sits in the partial folder; the target does not exist; the half never loads
    partial = partial_folder(target)
    assert not target.exists() and (partial / "model-00001-of-00004.safetensors").is_file()
    assert not (cache / "img-llava-13b-original" / "llava" / "pytorch_model-00001-of-00003.bin").exists()
    assert not is_prepared(partial)
    with pytest.raises(WeightsNotFoundError, match="incomplete conversion"):
        check_prepared_folder(partial)
    with pytest.raises(WeightsNotFoundError):
        MLLMCritic.load(prepared_spec("img-llava-13b", target))

    # rerun: resumes after shard 1 (not downloaded again) and completes
    report = prepare("sdxl", cache_dir=cache, with_aligner=False, show_progress_bars=False)
    assert report.mllm_folder == target and is_prepared(target) and not partial.exists()
    assert "llava/pytorch_model-00001-of-00003.bin" not in hub.requested(IMG_REPO)
    assert "llava/pytorch_model-00002-of-00003.bin" in hub.requested(IMG_REPO)
    assert_loads_with_reference_logits(target, reference_logits)


def test_low_disk_is_refused_before_anything_is_converted(hub, tmp_path, stand_in):
    cache = tmp_path / "cache"
    with pytest.raises(NotEnoughDiskError, match=r"needs about 1\.0 GB free in .*cache.* only 0\.0 GB are free"):
        prepare("sdxl", cache_dir=cache, free_bytes=1000, show_progress_bars=False)
    target = prepared_folder("img-llava-13b", cache)
    assert not target.exists() and not partial_folder(target).exists()
    assert not any(name.endswith(".bin") for _, patterns, _ in hub.calls for name in patterns or [])


def test_one_preparation_at_a_time(tmp_path):
    import fcntl

    from img_core.weights.convert_llava import PreparationBusyError
    from img_core.weights.convert_llava import exclusive_lock as _exclusive_lock

    lock = tmp_path / ".img-llava-13b-hf.lock"
    with open(lock, "a") as other_process:  # another open file description: what another process holds
        fcntl.flock(other_process, fcntl.LOCK_EX)
        with pytest.raises(PreparationBusyError, match="another process is preparing img-llava-13b-hf"):
            with _exclusive_lock(lock, timeout_s=0.2):
                pass
        fcntl.flock(other_process, fcntl.LOCK_UN)
    with _exclusive_lock(lock, timeout_s=0.2):
        pass


def test_disk_need_counts_one_original_shard_unless_kept():
    shards = {"a": 10.0, "b": 12.0, "c": 4.0}
    assert conversion_disk_need(shards, done=set(), keep_original=False) == 26 + 12
    assert conversion_disk_need(shards, done=set(), keep_original=True) == 26 + 26
    assert conversion_disk_need(shards, done={"b"}, keep_original=False) == 14 + 10
    assert conversion_disk_need(shards, done={"a", "b", "c"}, keep_original=False) == 0


def test_offline_with_nothing_cached_gives_the_loaders_message(tmp_path):
    """The real download function, offline: the same message as loading the missing MLLM."""
    with pytest.raises(WeightsNotFoundError) as prepared:
        ensure_prepared("sdxl", cache_dir=tmp_path / "cache")
    target = prepared_folder("img-llava-13b", tmp_path / "cache")
    with pytest.raises(WeightsNotFoundError) as loaded:
        MLLMCritic.load(prepared_spec("img-llava-13b", target))
    prefix = f"weights of MLLM 'img-llava-13b' not found at {target} ("
    assert str(prepared.value).startswith(prefix) and str(loaded.value).startswith(prefix)
    hint = str(loaded.value).split("). ", 1)[1]
    assert str(prepared.value).endswith(hint) and "shi-labs/IMG" in hint
    assert not target.exists()


def test_damaged_or_markerless_conversions_are_refused(hub, tmp_path):
    folder = prepare("sdxl", cache_dir=tmp_path / "cache", with_aligner=False, show_progress_bars=False).mllm_folder
    check_prepared_folder(folder)
    with open(folder / "model-00002-of-00004.safetensors", "ab") as shard:
        shard.write(b"\0")
    with pytest.raises(WeightsNotFoundError, match="damaged: model-00002-of-00004.safetensors"):
        check_prepared_folder(folder)
    (folder / COMPLETION_MARKER).unlink()
    (folder / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="incomplete conversion"):
        ensure_prepared(str(folder))


def test_mllm_hub_id_of_a_converted_copy_is_only_downloaded(hub, stand_in, tmp_path):
    converted = prepare("sdxl", cache_dir=tmp_path / "first", with_aligner=False,
                        show_progress_bars=False).mllm_folder
    hub.repos = dict(hub.repos, **{"someone/img-llava-13b-hf": converted})
    hub.calls.clear()
    report = prepare("sdxl", mllm="someone/img-llava-13b-hf", cache_dir=tmp_path / "second", with_aligner=False,
                     show_progress_bars=False)
    assert [call[:2] for call in hub.calls] == [("someone/img-llava-13b-hf", None)]
    assert is_prepared(report.mllm_folder) and not (tmp_path / "second").exists()


def test_push_to_hub_is_refused_offline_or_with_a_bad_id(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert convert_llava_main(["--source", str(tmp_path / "nowhere"), "--out", out, "--push-to-hub", "no id"]) == 1
    assert "owner/name" in capsys.readouterr().err
    assert convert_llava_main(["--source", str(tmp_path / "nowhere"), "--out", out, "--push-to-hub", "a/b c"]) == 1
    assert "not a valid hub repo id" in capsys.readouterr().err
    assert convert_llava_main(["--out", out, "--push-to-hub", "someone/img-llava"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shard_names_and_sizes_come_from_the_hub_listing_when_there_is_no_index(tmp_path):
    from img_core.weights.prepare import _shard_bytes, _shard_names

    listing = {"llava/config.json": 900, "llava/model-00001-of-00002.safetensors": 9_900_000_000,
               "llava/model-00002-of-00002.safetensors": 6_100_000_000, "llava/pytorch_model.bin": 1,
               "aligner_sdxl.pth": 780_000_000}
    names = _shard_names(tmp_path, listing, "llava")
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    sizes = _shard_bytes(tmp_path, listing, "llava", names, estimate=26.7e9)
    assert sizes == {names[0]: 9.9e9, names[1]: 6.1e9}
    assert conversion_disk_need(sizes, done=set(), keep_original=False) == 16e9 + 9.9e9
    assert _shard_names(tmp_path, None, "llava") is None  # nothing says: fetch all weight files
    assert _shard_bytes(tmp_path, None, "llava", None, estimate=26.7e9) == {"(weights)": 26.7e9}


# --- prepare --all: every hub file of the diffusion side ------------------------------------------------

# The real repos' file names (each a few bytes here): what a preset loads, and what it must not fetch.
DIFFUSION_REPOS = {
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "needed": ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                   "text_encoder/model.fp16.safetensors", "text_encoder_2/config.json",
                   "text_encoder_2/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
                   "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer_2/merges.txt",
                   "tokenizer_2/vocab.json", "tokenizer_2/tokenizer_config.json", "unet/config.json",
                   "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.fp16.safetensors"],
        "not": ["sd_xl_base_1.0.safetensors", "sd_xl_refiner_example.safetensors", "text_encoder/model.safetensors",
                "unet/diffusion_pytorch_model.safetensors", "unet/openvino_model.bin", "vae_1_0/config.json",
                "vae/diffusion_pytorch_model.safetensors", "01.png"],
    },
    "mhdang/dpo-sdxl-text2image-v1": {
        "needed": ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"], "not": ["README.md"],
    },
    "h94/IP-Adapter": {
        "needed": ["sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder/config.json",
                   "models/image_encoder/model.safetensors"],
        "not": ["sdxl_models/ip-adapter_sdxl.safetensors", "models/ip-adapter_sd15.bin",
                "models/image_encoder/pytorch_model.bin", "sdxl_models/image_encoder/model.safetensors"],
    },
    "black-forest-labs/FLUX.1-dev": {
        "needed": ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "text_encoder_2/config.json",
                   "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
                   "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
                   "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json", "transformer/config.json",
                   "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
                   "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors"],
        "not": ["flux1-dev.safetensors", "ae.safetensors", "dev_grid.jpg"],
    },
    "XLabs-AI/flux-ip-adapter": {"needed": ["ip_adapter.safetensors"], "not": ["ip_adapter_workflow.json"]},
    "openai/clip-vit-large-patch14": {
        "needed": ["config.json", "preprocessor_config.json", "model.safetensors"],
        "not": ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
    },
}
PRESET_REPOS = {
    "sdxl": ["stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter"],
    "sdxl-dpo": ["stabilityai/stable-diffusion-xl-base-1.0", "mhdang/dpo-sdxl-text2image-v1", "h94/IP-Adapter"],
    "flux-dev": ["black-forest-labs/FLUX.1-dev", "XLabs-AI/flux-ip-adapter", "openai/clip-vit-large-patch14"],
}


@pytest.fixture(scope="module")
def diffusion_repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-hub")
    for repo, files in DIFFUSION_REPOS.items():
        for name in files["needed"] + files["not"]:
            path = root / repo.replace("/", "--") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
    return {repo: root / repo.replace("/", "--") for repo in DIFFUSION_REPOS}


@pytest.mark.parametrize("preset_name", sorted(PRESET_REPOS))
def test_prepare_all_fetches_every_file_the_preset_loads_and_nothing_else(
    hub, stand_in, diffusion_repos, tmp_path, capsys, preset_name, monkeypatch
):
    hub.repos = dict(hub.repos, **diffusion_repos, **{IMG_REPO: stand_in["repos"][IMG_REPO]})
    # the stand-in files are tiny but the disk check uses the real sizes (37 GB for flux-dev): this test is
    # about which files are fetched, not this machine's free space (the next test checks the disk rule)
    monkeypatch.setattr("img_core.weights.prepare.free_disk_bytes", lambda folder: 10**15)
    exit_code = cli_main(["prepare", "--preset", preset_name, "--all", "--cache-dir", str(tmp_path / "cache"),
                          "--quiet"])
    assert exit_code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    unet_replaced = preset_name == "sdxl-dpo"
    for repo in PRESET_REPOS[preset_name]:
        fetched = sorted(p.relative_to(hub.snapshot(repo)).as_posix() for p in hub.snapshot(repo).rglob("*")
                         if p.is_file())
        needed = DIFFUSION_REPOS[repo]["needed"]
        if unet_replaced and repo.startswith("stabilityai/"):  # the DPO UNet replaces the pipeline's
            needed = [name for name in needed if not name.startswith("unet/")]
        assert fetched == sorted(needed), repo
        assert f"{repo} (" in printed and "GB estimated)" in printed  # offline: the estimate is shown
    other = set(DIFFUSION_REPOS) - set(PRESET_REPOS[preset_name])
    assert not any(hub.snapshot(repo).exists() for repo in other)
    aligner = "aligner_sdxl.pth" if preset_name.startswith("sdxl") else "aligner_flux.pth"
    assert aligner in printed and ("resampler.pth" in printed) == preset_name.startswith("sdxl")
    assert is_prepared(tmp_path / "cache" / "img-llava-13b-hf")


def test_prepare_all_checks_the_disk_for_everything_before_downloading(hub, diffusion_repos, tmp_path):
    hub.repos = dict(hub.repos, **diffusion_repos)
    from img_core.presets import get_preset
    from img_core.weights.prepare import (
        PrepareReport,
        ProgressReporter,
        _fetch_diffusion,
    )

    with pytest.raises(NotEnoughDiskError, match=r"flux-dev diffusion models needs about 37\.4 GB"):
        _fetch_diffusion(get_preset("flux-dev"), 20 * 10**9, ProgressReporter(None, False), PrepareReport("flux-dev"))
    assert hub.calls == []


# --- interruptions: no full re-download, no stale full copy ---------------------------------------------


def test_a_complete_partial_folder_left_by_a_kill_is_moved_into_place_without_converting(hub, tmp_path):
    """Killed after the completion marker, before the journal was removed and the folder renamed."""
    done = prepare("sdxl", cache_dir=tmp_path / "first", with_aligner=False, show_progress_bars=False).mllm_folder
    cache = tmp_path / "cache"
    target = prepared_folder("img-llava-13b", cache)
    cache.mkdir()
    shutil.copytree(done, partial_folder(target))
    (partial_folder(target) / "conversion-progress.json").write_text('{"settings": {}, "done": []}')
    hub.calls.clear()
    report = prepare("sdxl", cache_dir=cache, with_aligner=False, show_progress_bars=False)
    assert report.mllm_folder == target and is_prepared(target) and not partial_folder(target).exists()
    assert not [p for p in hub.requested(IMG_REPO) if p.endswith(".bin")]  # no shard downloaded again
    assert not (target / "conversion-progress.json").exists()


def test_a_kill_inside_the_folder_swap_leaves_nothing_to_redo_and_no_stale_copy(hub, tmp_path):
    """Killed between parking the old copy (`.previous`) and renaming the new one, or after the rename
    before the old copy was deleted: the next run finishes the swap and deletes the parked copy."""
    done = prepare("sdxl", cache_dir=tmp_path / "first", with_aligner=False, show_progress_bars=False).mllm_folder
    cache = tmp_path / "cache"
    target = prepared_folder("img-llava-13b", cache)
    previous = target.with_name(f".{target.name}.previous")
    cache.mkdir()
    shutil.copytree(done, previous)  # window 1: old copy parked, new one still partial
    shutil.copytree(done, partial_folder(target))
    hub.calls.clear()
    prepare("sdxl", cache_dir=cache, with_aligner=False, show_progress_bars=False)
    assert is_prepared(target) and not previous.exists() and not partial_folder(target).exists()
    assert not [p for p in hub.requested(IMG_REPO) if p.endswith(".bin")]

    shutil.copytree(done, previous)  # window 2: new copy in place, old one not deleted yet
    assert ensure_prepared("sdxl", cache_dir=cache) == target
    assert not previous.exists() and is_prepared(target)


def test_convert_llava_and_prepare_share_one_lock(hub, stand_in, tmp_path, capsys):
    import fcntl

    from img_core.weights.convert_llava import conversion_lock_path

    out = tmp_path / "cache" / "img-llava-13b-hf"
    assert conversion_lock_path(out) == tmp_path / "cache" / ".img-llava-13b-hf.lock"
    prepare("sdxl", cache_dir=tmp_path / "cache", with_aligner=False, show_progress_bars=False)
    assert conversion_lock_path(out).is_file()  # prepare took it
    with open(conversion_lock_path(out), "a") as holder:  # another process preparing the same folder
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        script = ("import sys; from img_core.cli.convert_llava import main; "
                  f"sys.exit(main(['--source', {str(tmp_path / 'nowhere')!r}, '--out', {str(out)!r}]))")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
        waiting = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE,
                                   text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=8)  # blocked on the lock: it has not even looked at --source
        fcntl.flock(holder, fcntl.LOCK_UN)
    assert waiting.wait(timeout=60) == 1
    assert "nowhere" in waiting.stderr.read()
