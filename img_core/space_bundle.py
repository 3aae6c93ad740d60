"""The folder a Hugging Face Space needs, and its upload: `python -m img_core space-bundle --out DIR`.

A Space is a git repository that the Hub refuses to take binary files into outside LFS/Xet, and this
project's history holds golden test tensors. So a Space is never pushed from this repository: the bundle
copies exactly what the app needs into a fresh folder, and `push_bundle` uploads that folder with
`huggingface_hub`'s `upload_folder`.

    app.py, img_core/**.py, ui/**.py      the app and its packages (no trainer/, tests/, tools/, benchmarks/)
    assets/ (*.json, *.txt, images)       question templates and prompt sets
    README.md                             this repository's README under Spaces front matter (`space_front_matter`)
    requirements.txt                      requirements.txt's ranges with torch pinned to requirements-compat.txt
                                          (a version ZeroGPU provides), gradio left to `sdk_version`, plus `spaces`

`check_bundle` refuses a bundle holding a binary file other than an image.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from img_core.errors import InvalidInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("img_core", "ui")
ASSET_SUFFIXES = (".json", ".txt", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".svg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".svg")
# Spaces front matter (docs: hub/spaces-config-reference, hub/spaces-zerogpu). ZeroGPU supports Python
# 3.10.13 and 3.12.12; a Space without `python_version` gets 3.10. The first start downloads and converts
# the LLaVA (~27 GB): longer than the Hub's default 30 minutes.
SPACE_SETTINGS = {
    "sdk": "gradio",
    "app_file": "app.py",
    "python_version": "3.12.12",
    "startup_duration_timeout": "1h",
}
SPACE_PACKAGES = ("spaces",)  # ZeroGPU's decorators (ui/gpu.py); no-ops on other hardware


@dataclass(frozen=True)
class Bundle:
    """A written bundle: its folder and the files in it (relative paths, sorted)."""

    folder: Path
    files: tuple[str, ...]


def bundle_sources(root: Path = REPO_ROOT) -> list[Path]:
    """The files of the repository at `root` that a Space needs (relative paths), README and requirements
    excluded (they are rewritten)."""
    files = [Path("app.py")]
    for package in PACKAGES:
        files += [path.relative_to(root) for path in sorted((root / package).rglob("*.py"))
                  if "__pycache__" not in path.parts]
    files += [path.relative_to(root) for path in sorted((root / "assets").rglob("*"))
              if path.is_file() and path.suffix.lower() in ASSET_SUFFIXES]
    return files


def read_front_matter(readme: str) -> tuple[dict[str, str], str]:
    """(front matter as {key: value}, body) of a README that starts with `---` ... `---` of `key: value`
    lines (the form this repository's README uses); ({}, readme) without front matter."""
    match = re.match(r"\A---\n(.*?)\n---\n", readme, flags=re.DOTALL)
    if not match:
        return {}, readme
    settings = {}
    for line in match.group(1).splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() and not line.startswith((" ", "-")):
            settings[key.strip()] = value.strip()
    return settings, readme[match.end():]


def space_front_matter(readme: str, gradio_version: str) -> str:
    """The README's front matter with the Space settings this app needs (`SPACE_SETTINGS`, `sdk_version`
    = the tested gradio) put over it, as YAML text between `---` lines."""
    settings, _ = read_front_matter(readme)
    settings.update(SPACE_SETTINGS, sdk_version=gradio_version)
    lines = [f"{key}: {_yaml_scalar(value)}" for key, value in settings.items()]
    return "---\n" + "\n".join(lines) + "\n---\n"


def _yaml_scalar(value: str) -> str:
    """Versions and durations quoted (YAML would read 3.12 as a number), everything else as it is."""
    return f'"{value.strip(chr(34))}"' if re.fullmatch(r'"?[\d.]+"?', value) else value


def pinned_version(lock_text: str, package: str) -> str:
    """The `package==X` version of a requirements file (the lock), or an InvalidInputError."""
    match = re.search(rf"^{re.escape(package)}==([^\s#]+)", lock_text, flags=re.MULTILINE | re.IGNORECASE)
    if not match:
        raise InvalidInputError(f"no {package}==VERSION pin in the lock file")
    return match.group(1)


def space_requirements(requirements: str, compat: str) -> str:
    """requirements.txt for a Space: the supported ranges, torch and torchvision pinned as in
    requirements-compat.txt (versions ZeroGPU provides), no gradio (the Space's `sdk_version` installs
    it), plus `SPACE_PACKAGES`."""
    pins = [line for line in compat.splitlines() if line.strip() and not line.startswith("#")]
    pinned = {re.split(r"[<>=!~\s]", pin, maxsplit=1)[0].lower() for pin in pins}
    kept = []
    for line in requirements.splitlines():
        name = re.split(r"[<>=!~\s\[;]", line.strip(), maxsplit=1)[0].lower()
        if not line.strip() or line.startswith("#") or name in pinned or name == "gradio":
            continue
        kept.append(line)
    header = ("# Generated by `python -m img_core space-bundle` from requirements.txt and requirements-compat.txt:\n"
              "# torch pinned to a version ZeroGPU provides; gradio comes from the README's sdk_version.\n")
    return header + "\n".join([*pins, *kept, *SPACE_PACKAGES]) + "\n"


def write_bundle(out: str | Path, root: Path = REPO_ROOT) -> Bundle:
    """Write the Space folder into `out` (which must be empty or absent) and check it."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"{out} is not empty: give a new or empty folder for the Space bundle")
    readme = (root / "README.md").read_text(encoding="utf-8")
    lock = (root / "requirements-lock.txt").read_text(encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    for relative in bundle_sources(root):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, out / relative)
    _, body = read_front_matter(readme)
    (out / "README.md").write_text(space_front_matter(readme, pinned_version(lock, "gradio")) + body, encoding="utf-8")
    (out / "requirements.txt").write_text(
        space_requirements((root / "requirements.txt").read_text(), (root / "requirements-compat.txt").read_text()),
        encoding="utf-8",
    )
    bundle = Bundle(out, tuple(sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())))
    check_bundle(bundle)
    return bundle


def check_bundle(bundle: Bundle) -> None:
    """Refuse a bundle with a binary file that is not an image (the Hub would refuse it outside LFS/Xet)."""
    for name in bundle.files:
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            continue
        if b"\0" in (bundle.folder / name).read_bytes()[:8192]:
            raise InvalidInputError(f"{name} is a binary file: a Space bundle holds only text and images")


def check_space_id(space_id: str) -> None:
    """Refuse a malformed Space id, or pushing while HF_HUB_OFFLINE is set, before any work."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if space_id.count("/") != 1:
        raise InvalidInputError(f"--push needs a Space id of the form USER/SPACE, got {space_id!r}")
    try:
        validate_repo_id(space_id)
    except HFValidationError as error:
        raise InvalidInputError(f"--push: {space_id!r} is not a valid Space id ({error})") from error
    if constants.HF_HUB_OFFLINE:
        raise InvalidInputError("--push needs the Hub, but HF_HUB_OFFLINE is set: unset it and log in (hf auth login)")


def push_bundle(bundle: Bundle, space_id: str, api=None, private: bool = False) -> str:
    """Create Space `space_id` (Gradio SDK) if needed and upload the bundle as one commit with
    `upload_folder` (files the bundle no longer has are deleted from the Space). `api`: a
    `huggingface_hub.HfApi` (default: the logged-in one). Returns the Space's URL."""
    check_space_id(space_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(bundle.folder),
                      commit_message="IMG Studio: python -m img_core space-bundle", delete_patterns=["*"])
    return f"https://huggingface.co/spaces/{space_id}"
