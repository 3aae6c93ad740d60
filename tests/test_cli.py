"""`python -m img_core refine` end to end in a subprocess, and its bad-input behaviour."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m img_core ARGS` without a new interpreter (bad-input paths load no model: seconds saved)."""
    from img_core.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "img_core", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-flux"])
def test_refine_two_rounds_writes_images_and_session(tmp_path, tiny_root, preset):
    out = tmp_path / preset
    result = run_cli("refine", "--preset", preset, "--prompt", "A green banana and a brown horse.",
                     "--seed", "0", "--rounds", "2", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "IMG" in result.stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["round_0.png", "round_1.png", "round_2.png", "session.json"]
    session = json.loads((out / "session.json").read_text())
    assert session["preset"] == preset and session["seed"] == 0 and session["prompt"].startswith("A green banana")
    assert [r["index"] for r in session["rounds"]] == [0, 1, 2]
    for r in session["rounds"][1:]:
        assert r["critique"] and r["guidance_mode"] == "question" and r["settings"]["steps"] == 2
        assert set(r["seconds"]) == {"critique", "image_features", "align", "regenerate"}  # one MLLM prefill
    images = [np.asarray(Image.open(out / f"round_{i}.png"), dtype=float) for i in range(3)]
    assert images[0].shape == (64, 64, 3)
    assert np.abs(images[1] - images[0]).mean() > 0.5


def test_refine_from_users_image_quietly(tmp_path, tiny_root):
    Image.new("RGBA", (80, 50), (0, 128, 0, 255)).save(tmp_path / "mine.png")
    result = run_cli("refine", "--preset", "tiny-sdxl", "--prompt", "a cat", "--image", str(tmp_path / "mine.png"),
                     "--rounds", "1", "--steps", "1", "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "IMG" not in result.stderr
    assert Image.open(tmp_path / "out" / "round_0.png").size == (80, 50)
    assert json.loads((tmp_path / "out" / "session.json").read_text())["rounds"][0]["source"] == "uploaded"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "a cat", "--image", "NOT_AN_IMAGE"], "not an image"),
        (["--prompt", "a cat", "--image", "/nonexistent/cat.png"], "does not exist"),
        (["--prompt", "a cat", "--steps", "0"], "steps must be"),
        (["--prompt", "a cat", "--aligner", "ALIGNER_SDXL", "--preset", "tiny-flux"], "sdxl-ip-adapter-plus-vit-h"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, tiny_root, capsys, args, message):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    args = [str(not_image) if a == "NOT_AN_IMAGE" else str(tiny_root / "tiny-aligner-sdxl") if a == "ALIGNER_SDXL" else a
            for a in args]
    if "--preset" not in args:
        args += ["--preset", "tiny-sdxl"]
    if "--steps" not in args:
        args += ["--steps", "1"]
    result = run_in_process(capsys, "refine", *args, "--rounds", "1", "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_unwritable_out_is_refused_before_any_model_loads(tmp_path, capsys):
    """A bad --out used to be found only after every round was generated; now it costs nothing."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # The real sdxl preset cannot load here: reaching the --out check first proves nothing was loaded.
    result = run_in_process(capsys, "refine", "--preset", "sdxl", "--prompt", "a cat", "--out", str(blocker / "sub"),
                            "--quiet")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--out" in lines[0] and "cannot be written" in lines[0] and "stabilityai" not in lines[0]
    result = run_in_process(capsys, "refine", "--preset", "sdxl", "--prompt", "a cat", "--out", str(blocker), "--quiet")
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr


def test_missing_real_weights_offline_is_one_line(tmp_path, capsys):
    result = run_in_process(capsys, "refine", "--preset", "sdxl", "--device", "cpu", "--prompt", "a cat", "--out", str(tmp_path), "--quiet")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "img-llava-13b" in lines[0] and "python -m img_core prepare" in lines[0], result.stderr
    result = run_in_process(capsys, "refine", "--preset", "sdxl", "--mllm", "llava-1.5-13b", "--device", "cpu",
                            "--prompt", "a cat", "--out", str(tmp_path), "--quiet")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stabilityai/stable-diffusion-xl-base-1.0" in lines[0], result.stderr
