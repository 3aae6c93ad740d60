"""`evaluate` split across processes with accelerate: two CPU processes (gloo) write the same results.jsonl
and summary.json as one process; shards left by an interrupted run are merged on resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS = 4


def evaluate_args(out: Path) -> list[str]:
    from img_core.evaluation.prompt_sets import COMPOSITIONAL_PROMPTS

    # --score-batch 1: each image is scored alone in both runs, so the scores are bit-identical
    return ["--preset", "tiny-sdxl", "--prompts", str(COMPOSITIONAL_PROMPTS), "--limit", str(PROMPTS), "--rounds",
            "1", "--steps", "2", "--scorers", "clipscore,vqascore", "--score-batch", "1", "--out", str(out), "--quiet"]


def launch_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU: two CPU processes (gloo)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "img_core", "evaluate", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows_without_timing(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tiny_root, tmp_path, one_thread):
    from img_core.cli.evaluate import main

    single, split = tmp_path / "single", tmp_path / "split"
    assert main(evaluate_args(single)) == 0
    launch_two_processes(evaluate_args(split))
    assert not list((split / "shards").glob("*.jsonl"))  # merged and removed
    assert rows_without_timing(split) == rows_without_timing(single)
    summary_single = json.loads((single / "summary.json").read_text())
    summary_split = json.loads((split / "summary.json").read_text())
    for summary in (summary_single, summary_split):
        summary["settings"].pop("prompts")  # the same file, named by the same path: equal anyway
    assert summary_split == summary_single
    assert sorted(p.name for p in (split / "images").iterdir()) == sorted(p.name for p in (single / "images").iterdir())
    # a second launch on the finished folder makes and scores nothing in either process
    before = (split / "results.jsonl").read_text()
    launch_two_processes(evaluate_args(split))
    assert (split / "results.jsonl").read_text() == before


def test_shards_of_an_interrupted_run_are_merged(tmp_path):
    from img_core.evaluation.evaluate import read_results

    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / "shards").mkdir()
    for name in ("00000_r0.png", "00000_r1.png", "00001_r0.png"):
        (out / "images" / name).write_bytes(b"png")
    row = {"prompt_index": 0, "seed_index": 0, "prompt": "a", "seed": 0, "round": 0, "image": "images/00000_r0.png"}
    (out / "results.jsonl").write_text(json.dumps({**row, "scores": {"clipscore": 1.0}}) + "\n")
    shard_rows = [{**row, "scores": {"vqascore": 0.5}},
                  {**row, "round": 1, "image": "images/00000_r1.png", "scores": {}}]
    (out / "shards" / "results.000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shard_rows))
    other = {**row, "prompt_index": 1, "prompt": "b", "seed": 1, "image": "images/00001_r0.png", "scores": {}}
    (out / "shards" / "results.001.jsonl").write_text(json.dumps(other) + "\n" + '{"prompt_index": 1, "rou')
    rows = read_results(out)
    assert sorted(rows) == [(0, 0, 0), (0, 0, 1), (1, 0, 0)]  # the cut-off last line of shard 1 is dropped
    assert rows[(0, 0, 0)]["scores"] == {"clipscore": 1.0, "vqascore": 0.5}  # both scorers' work kept
