"""`python -m img_core space-bundle`: exactly the folder a Hugging Face Space needs (img_core/space_bundle.py)."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from img_core.cli.main import main as cli_main
from img_core.errors import InvalidInputError
from img_core.space_bundle import (
    SPACE_SETTINGS,
    Bundle,
    check_bundle,
    pinned_version,
    read_front_matter,
    write_bundle,
)

ROOT = Path(__file__).resolve().parents[1]
ZERO_GPU_TORCH = ("2.8.0", "2.9.1", "2.10.0", "2.11.0")  # hub docs, spaces-zerogpu, "Supported versions"
ZERO_GPU_PYTHON = ("3.10.13", "3.12.12")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return write_bundle(tmp_path_factory.mktemp("space") / "img-studio")


def test_the_bundle_holds_the_app_its_packages_and_assets_and_nothing_else(bundle):
    files = set(bundle.files)
    assert {"app.py", "README.md", "requirements.txt", "img_core/__init__.py", "img_core/session.py",
            "ui/__init__.py", "ui/layout.py", "ui/gpu.py", "assets/question_templates.json"} <= files
    tops = {name.split("/")[0] for name in files}
    assert tops == {"app.py", "README.md", "requirements.txt", "img_core", "ui", "assets"}
    assert not any(part in name for name in files for part in ("tests/", "golden", "benchmarks", "tools/", "trainer/"))
    assert not any(name.endswith((".pyc", ".pth", ".safetensors", ".bin")) for name in files)
    tracked = subprocess.run(["git", "ls-files", "img_core", "ui"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # every tracked module of the two packages is in it
        assert {name for name in tracked.stdout.split() if name.endswith(".py")} <= files


def test_the_readme_has_valid_spaces_front_matter(bundle):
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(bundle.folder / "README.md")
    lock = (ROOT / "requirements-lock.txt").read_text()
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert (bundle.folder / card.data.app_file).is_file()
    assert card.data.sdk_version == pinned_version(lock, "gradio") == "6.31.0"
    assert card.data.python_version in ZERO_GPU_PYTHON and card.data.python_version.startswith("3.12")
    assert card.data.get("startup_duration_timeout") == "1h" and card.data.title == "IMG Studio"
    settings, body = read_front_matter((bundle.folder / "README.md").read_text())
    assert all(settings[key].strip('"') == value for key, value in SPACE_SETTINGS.items())
    assert body.startswith("\n# IMG Studio") or body.lstrip().startswith("# IMG Studio")


def test_the_spaces_requirements_pin_a_torch_zero_gpu_provides(bundle):
    lines = [line for line in (bundle.folder / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    requirements = {Requirement(line).name.lower(): Requirement(line) for line in lines}  # each line parses
    assert str(requirements["torch"].specifier).removeprefix("==") in ZERO_GPU_TORCH
    assert str(requirements["torchvision"].specifier) == "==0.24.1"
    assert "gradio" not in requirements and "spaces" in requirements  # gradio comes from sdk_version
    ranges = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for line in ranges:  # every other supported range is carried over as it is
        name = Requirement(line).name.lower()
        if name not in ("torch", "torchvision", "gradio"):
            assert str(requirements[name].specifier) == str(Requirement(line).specifier)


def test_a_binary_file_other_than_an_image_is_refused(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (tmp_path / "weights.py").write_bytes(b"import x\n\0\0\0")
    with pytest.raises(InvalidInputError, match="weights.py is a binary file"):
        check_bundle(Bundle(tmp_path, ("ok.png", "weights.py")))
    check_bundle(Bundle(tmp_path, ("ok.png",)))


def test_the_command_refuses_a_used_folder_a_bad_id_and_offline_pushes(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert cli_main(["space-bundle", "--out", str(used)]) == 1
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    assert cli_main(["space-bundle", "--out", str(tmp_path / "a"), "--push", "no id"]) == 1
    assert "USER/SPACE" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert cli_main(["space-bundle", "--out", str(tmp_path / "b"), "--push", "me/img-studio"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_dry_run_lists_the_upload(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # nothing is sent in a dry run
    assert cli_main(["space-bundle", "--out", str(tmp_path / "s"), "--push", "me/img-studio", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    listed = re.findall(r"^  (\S+)$", printed, flags=re.MULTILINE)
    assert "spaces/me/img-studio" in printed and "app.py" in listed and "requirements.txt" in listed
    assert sorted(listed) == sorted(p.relative_to(tmp_path / "s").as_posix()
                                    for p in (tmp_path / "s").rglob("*") if p.is_file())


@pytest.mark.slow
def test_the_bundled_app_starts_and_answers_generate_and_refine(bundle, tiny_root):
    """The bundle alone (no repository around it) runs the tiny app, as a Space would start it."""
    from gradio_client import Client, handle_file

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", IMG_PRESET="tiny-sdxl",
               GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), PYTHONPATH="")
    log = bundle.folder.parent / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=bundle.folder, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.25)
        client = Client(url, verbose=False)
        original = client.predict("A green banana and a brown horse.", 3, api_name="/generate")
        refined = client.predict(handle_file(original), "A green banana and a brown horse.", "", 3,
                                 api_name="/refine")
        from PIL import Image

        assert Image.open(original).size == Image.open(refined).size == (64, 64)
        assert Image.open(original).tobytes() != Image.open(refined).tobytes()
    finally:
        process.terminate()
        process.wait(timeout=30)
