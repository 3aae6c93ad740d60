"""`pip install .` gives working console commands: `img-studio` (app.py) and `img-core` (python -m img_core).

Installed offline into a fresh venv (`--no-deps --no-index`, by this interpreter's pip with `--python`); the
dependencies come from the running interpreter's site-packages through a .pth file, so nothing is downloaded. Everything runs from a folder
outside the repository, so the installed copy is what is imported."""

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with this repository installed into it; returns the venv's bin folder."""
    venv = tmp_path_factory.mktemp("pkg") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # no old setuptools
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    shared = [path for path in site.getsitepackages() if Path(path).is_dir()]
    (Path(purelib) / "shared-dependencies.pth").write_text("\n".join(shared) + "\n")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", "--no-build-isolation", str(ROOT)], check=True, cwd=build, capture_output=True,
                   text=True)
    return venv / "bin"


def run(command: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **env))


def test_both_console_commands_answer_help(installed, tmp_path):
    app = run([str(installed / "img-studio"), "--help"], tmp_path)
    cli = run([str(installed / "img-core"), "--help"], tmp_path)
    assert app.returncode == 0 and "--preset" in app.stdout and "--allow-model-switch" in app.stdout, app.stderr
    assert cli.returncode == 0 and "refine" in cli.stdout and "space-bundle" in cli.stdout, cli.stderr


def test_the_installed_copy_is_imported_with_its_assets(installed, tmp_path):
    probe = ("import json, app, img_core, ui; from img_core.paths import ASSETS_DIR; "
             "print(json.dumps([app.__file__, img_core.__file__, ui.__file__, "
             "(ASSETS_DIR / 'question_templates.json').is_file()]))")
    found = run([str(installed / "python"), "-c", probe], tmp_path)
    app_file, core_file, ui_file, has_assets = json.loads(found.stdout)
    venv = str(installed.parent)
    assert all(path.startswith(venv) for path in (app_file, core_file, ui_file)) and has_assets


def test_the_cli_command_refines_on_tiny_sdxl(installed, tmp_path, tiny_root):
    out = tmp_path / "run"
    done = run([str(installed / "img-core"), "refine", "--preset", "tiny-sdxl", "--prompt", "a red cube",
                "--rounds", "1", "--steps", "2", "--out", str(out), "--quiet"], tmp_path, IMG_TINY_DIR=str(tiny_root))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "session.json").read_text())
    assert len(record["rounds"]) == 2 and (out / "round_1.png").is_file()


def test_no_source_needs_a_python_newer_than_the_oldest_supported():
    """pyproject's requires-python holds for every module: vermin reads the syntax and the standard library
    members each file uses. `int.is_integer` is excluded: vermin takes `float.is_integer` (every version)
    for it."""
    import re

    minimum = re.search(r'^requires-python = ">=(3\.\d+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert minimum and minimum.group(1) == "3.11"
    vermin = Path(sys.executable).with_name("vermin")
    result = subprocess.run(
        [str(vermin), f"-t={minimum.group(1)}-", "--violations", "--no-tips", "--eval-annotations",
         "--exclude", "int.is_integer", "img_core", "ui", "trainer", "app.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
