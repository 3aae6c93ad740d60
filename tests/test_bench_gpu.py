"""benchmarks/bench_gpu.py: the GPU benchmark runs end to end on a CPU at reduced size, and at scale 1 it
builds the architectures whose parameter counts the README states (counted on the meta device)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_gpu  # noqa: E402
from real_architectures import Scale  # noqa: E402

# Two rows that between them cover both diffusion families, both MLLM families, an unquantized pipeline
# and diffusion-side nf4 (a diffusers model and FLUX's T5). bnb-8bit MLLM rows take the same path as nf4
# (`with_transformers_quantization`) but run float16 matmuls, which are slow on a CPU.
CPU_ROWS = ("sdxl/none/img-llava-13b/bnb-nf4", "flux-dev/bnb-nf4/qwen2.5-vl-7b/bnb-nf4")
CPU_SCALE = 0.05
BUILD_STAGES = ("build_diffusion", "build_mllm", "build_aligner")
ROUND_STAGES = ("generate", "image_features", "align", "regenerate")
MLLM_STAGES = ("critique", "guidance")  # one MLLM prefill may give both: then only "critique" is reported


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-gpu") / "result.json"
    argv = ["--device", "cpu", "--scale", str(CPU_SCALE), "--out", str(out)]
    for row in CPU_ROWS:
        argv += ["--rows", row]
    returned = bench_gpu.main(argv)
    return returned, out


def test_cpu_run_writes_every_requested_row_with_positive_stage_seconds(cpu_run):
    returned, out = cpu_run
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))  # the file holds what main() returned
    assert report["format"] == bench_gpu.RESULT_FORMAT
    assert report["scale"] == CPU_SCALE
    assert report["device"]["type"] == "cpu"
    assert report["offload"] is False
    assert [row["row"] for row in report["rows"]] == list(CPU_ROWS)
    for row in report["rows"]:
        assert "error" not in row
        preset, diffusion_quantization, mllm, mllm_quantization = row["row"].split("/")
        assert (row["preset"], row["diffusion_quantization"], row["mllm"], row["mllm_quantization"]) == (
            preset, diffusion_quantization, mllm, mllm_quantization)
        assert set(BUILD_STAGES + ROUND_STAGES) <= set(row["seconds"]) <= set(BUILD_STAGES + ROUND_STAGES + MLLM_STAGES)
        assert "critique" in row["seconds"]  # the critique always runs (RoundSettings' default)
        assert all(seconds > 0 for seconds in row["seconds"].values()), row["seconds"]
        assert row["settings"]["width"] == row["settings"]["height"] == 64  # 1024 px x 0.05, at least 64
        assert row["settings"]["steps"] == 2
        assert row["memory_gib"] == {"build": None, "rounds": None}  # CUDA figures only
        assert row["offload"] is False
        assert all(gib > 0 for gib in row["weights_gib"].values())
        assert row["critique_characters"] > 0


def test_cpu_run_applies_each_rows_quantization(cpu_run):
    rows = {row["row"]: row for row in cpu_run[0]["rows"]}
    sdxl, flux = rows[CPU_ROWS[0]], rows[CPU_ROWS[1]]
    assert sdxl["quantized_layers"]["diffusion"] == 0  # "none": the UNet stays in the pipeline's dtype
    assert sdxl["quantized_layers"]["mllm"] > 0
    assert sdxl["dtype"] == {"diffusion": "float32", "mllm": "float32"}  # what a session uses on a CPU
    assert flux["quantized_layers"]["diffusion"] > 0  # nf4 transformer and T5
    assert flux["quantized_layers"]["mllm"] > 0


def test_rows_are_the_readme_memory_table():
    readme = (BENCHMARKS.parent / "README.md").read_text()
    section = readme.split("### Memory (estimate) against a 24 GB GPU")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]  # no header
    assert len(lines) == len(bench_gpu.README_ROWS)
    for line, row in zip(lines, bench_gpu.README_ROWS):
        cells = [cell.strip(" *") for cell in line.strip("|").split("|")]
        assert cells[0].split(" ")[0] == row.preset
        assert cells[2] == row.mllm
        assert ("nf4" in cells[1]) == (row.diffusion_quantization == "bnb-nf4")
        assert {"bf16": "none", "int8": "bnb-8bit", "nf4": "bnb-nf4"}[cells[3]] == row.mllm_quantization


def test_rows_filter_refuses_a_pattern_that_matches_nothing():
    with pytest.raises(SystemExit, match="matches no row"):
        bench_gpu.select_rows(["sdxl/none/no-such-mllm/*"])
    assert [row.name for row in bench_gpu.select_rows(["flux-dev/*"])] == [
        row.name for row in bench_gpu.README_ROWS if row.preset == "flux-dev"]


def test_rows_from_separate_runs_fill_one_file_in_readme_order(tmp_path):
    first, second, third = (row.name for row in bench_gpu.README_ROWS[:3])
    merged = bench_gpu.merge_rows(
        [{"row": third, "seconds": {"generate": 1.0}}, {"row": first, "seconds": {"generate": 2.0}}],
        [{"row": second, "seconds": {}}, {"row": first, "error": "OutOfMemoryError: again"}],
    )
    assert [result["row"] for result in merged] == [first, second, third]
    assert merged[0] == {"row": first, "error": "OutOfMemoryError: again"}  # the new measurement wins
    # Rows are only kept from a file written for the same device, scale and offload mode.
    report = {"format": bench_gpu.RESULT_FORMAT, "scale": 1.0, "offload": False, "device": {"name": "GPU X"}}
    out = tmp_path / "gpu.json"
    out.write_text(json.dumps({**report, "rows": merged}))
    assert bench_gpu.previous_rows(out, report) == merged
    assert bench_gpu.previous_rows(out, {**report, "scale": 0.5}) == []
    assert bench_gpu.previous_rows(out, {**report, "device": {"name": "GPU Y"}}) == []
    out.write_text("{ cut off")
    assert bench_gpu.previous_rows(out, report) == []


def test_flags_a_cpu_cannot_honour_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cpu"])  # scale 1 = the real models
    assert "need a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cpu", "--scale", "0.05", "--offload"])
    assert "needs --device cuda" in capsys.readouterr().err


def _billions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)


def test_scale_1_builds_the_parameter_counts_the_readme_states():
    meta, real_size = torch.device("meta"), Scale(1.0)
    sdxl = bench_gpu.sdxl_components(real_size, meta, torch.float16)
    flux = bench_gpu.flux_components(real_size, meta, torch.bfloat16)
    llava, _ = bench_gpu.build_llava(real_size, meta, torch.bfloat16)
    qwen, _ = bench_gpu.build_qwen(real_size, meta, torch.bfloat16)
    assert _billions(sdxl["unet"]) == 2.57
    assert _billions(flux["transformer"]) == 11.90
    assert _billions(flux["text_encoder_2"]) == 4.76
    assert _billions(sdxl["image_encoder"]) == 0.63
    assert _billions(llava) == 13.35
    assert _billions(qwen) == 8.29
    assert all(p.is_meta for p in flux["transformer"].parameters())  # counted without memory
