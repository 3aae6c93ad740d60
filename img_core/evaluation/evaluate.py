"""`python -m img_core evaluate`: the paper's win-rate protocol on a prompt set, and `evaluate-compare`.

    python -m img_core evaluate --preset sdxl --prompts hpd_test.json --rounds 1 --scorers hpsv2 --out runs/sdxl
    python -m img_core evaluate-compare runs/question runs/dialogue

For every prompt i (seed = --seed + i): round 0 is the base model's image, rounds 1..N are IMG rounds, each
from the previous image, as `refine` makes them. The folder DIR then holds

    DIR/images/{i:05d}_r{round}.png
    DIR/results.jsonl    one line per prompt and round: prompt_index, prompt, seed, round, image, scores
    DIR/summary.json     per scorer: mean per round, win rate of round k over round 0 (ties count one half)
                         and its 95 % bootstrap interval (1,000 resamples of the prompts, fixed seed);
                         the same per category for prompt files with `# category:` lines
    DIR/report.html      prompts x rounds grid with scores (best round marked) and a plot of the means;
                         it links the PNGs under images/ and needs no server
    DIR/run.json         the settings that made the images

Steps, as the code runs them:
    1. check the arguments and read the prompt set (nothing loads before that)
    2. refuse DIR if it holds images made with other settings; read what is already there
    3. generate the missing images (round by round, each saved and recorded at once: an interrupted run
       resumes where it stopped and generates nothing twice)
    4. free the diffusion pipeline and aligner (and the MLLM, unless `vqascore` uses it), then load one
       scorer at a time, score what it has not scored yet, and free it: one large model set at a time
    5. write summary.json and report.html, print the table
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from img_core.errors import InvalidInputError
from img_core.session import SESSION_PARTS
from img_core.tiny.models import ensure_tiny_models

logger = logging.getLogger(__name__)

RUN_FORMAT = "img-evaluate/1"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
RUN_FILE = "run.json"
IMAGES_DIR = "images"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
DEFAULT_SCORERS = "hpsv2"
DEFAULT_SCORE_BATCH = 8
SAVE_EVERY_SECONDS = 30.0  # how often scores are written back while a long scoring pass runs
# Settings that change the images: a folder made with other values is refused. --rounds, --limit and
# --scorers may change between runs (more rounds, prompts or scorers are added to what is there).
IMAGE_SETTINGS = ("preset", "prompts_sha256", "seed", "steps", "guidance_scale", "ip_scale", "aligner_passes",
                  "guidance_mode", "max_critique_tokens", "questions", "aligner", "mllm", "no_critique",
                  "quantization", "diffusion_quantization")


def image_name(prompt_index: int, round_index: int) -> str:
    return f"{IMAGES_DIR}/{prompt_index:05d}_r{round_index}.png"


def prompt_seed(seed: int, prompt_index: int) -> int:
    """Each prompt has its own seed; its base image and all its IMG rounds share it (REFERENCE §4)."""
    return seed + prompt_index


# ------------------------------------------------------------------------------------------- arguments


@dataclass
class EvaluationResult:
    out_dir: Path
    generated: int  # images made by this run
    scored: int  # (image, scorer) pairs scored by this run
    summary: dict


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Cheap checks before anything loads; returns the scorer names."""
    from img_core.evaluation.scorers import check_scorer_names
    from img_core.settings import check_rounds, check_seed

    if check_rounds(args.rounds) < 1:
        raise InvalidInputError("--rounds must be at least 1: the win rates compare rounds >= 1 with round 0")
    if args.limit is not None and args.limit < 1:
        raise InvalidInputError(f"--limit must be >= 1, got {args.limit}")
    if args.score_batch < 1:
        raise InvalidInputError(f"--score-batch must be >= 1, got {args.score_batch}")
    check_seed(args.seed)
    return check_scorer_names(args.scorers.split(","))


# ------------------------------------------------------------------------------------------ the run


def run_evaluation(args: argparse.Namespace) -> EvaluationResult:
    from img_core.evaluation.prompt_sets import load_prompt_set
    from img_core.presets import default_preset_name, get_preset
    from img_core.session import IMGSession
    from img_core.settings import model_options_from_args, round_settings_from_args

    # 1. arguments and prompts (the same settings and checks as `refine`)
    scorer_names = check_arguments(args)
    settings = round_settings_from_args(args)
    options = model_options_from_args(args)
    preset_name = options.preset or default_preset_name()
    preset = get_preset(preset_name)
    resolved = settings.resolve(preset)
    prompt_set = load_prompt_set(args.prompts, column=args.prompt_column, split=args.prompt_split)
    prompts = prompt_set.prompts[: args.limit] if args.limit else prompt_set.prompts
    run_settings = {
        "preset": preset_name, "prompts": prompt_set.source, "prompts_sha256": prompt_set.sha256,
        "prompt_count": len(prompt_set.prompts), "seed": args.seed, "steps": resolved.steps,
        "guidance_scale": resolved.guidance_scale, "ip_scale": resolved.ip_scale,
        "aligner_passes": resolved.aligner_passes, "guidance_mode": resolved.guidance_mode,
        "max_critique_tokens": resolved.max_critique_tokens, "questions": options.questions or preset.questions,
        "aligner": options.aligner, "mllm": options.mllm, "no_critique": not resolved.critique,
        "quantization": options.quantization, "diffusion_quantization": options.diffusion_quantization,
        "rounds": args.rounds, "limit": args.limit, "scorers": scorer_names,
    }

    # 2. the folder: refuse other settings, read what is there
    out_dir = Path(args.out)
    check_run_folder(out_dir, run_settings)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rows = read_results(out_dir)

    # 3. generation
    session = IMGSession(options, show_progress_bars=False)
    generated = generate_missing(session, prompts, args.seed, args.rounds, settings, out_dir, rows, quiet=args.quiet)

    # 4. scoring, one model set at a time
    scored = score_missing(session, scorer_names, prompts, args.rounds, out_dir, rows, args.score_batch, args.quiet)

    # 5. summary and report
    categories = prompt_set.categories[: len(prompts)]
    summary = summarize(rows, len(prompts), args.rounds, scorer_names, run_settings, categories)
    write_json_atomically(out_dir / SUMMARY_FILE, summary)
    write_report(out_dir, rows, summary, prompts)
    return EvaluationResult(out_dir, generated, scored, summary)


def check_run_folder(out_dir: Path, run_settings: dict) -> None:
    """Record the settings in a new folder; refuse a folder made with settings that change the images."""
    run_file = out_dir / RUN_FILE
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text())["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InvalidInputError(f"{run_file} is damaged ({error}): pass another --out") from error
        differing = [key for key in IMAGE_SETTINGS if recorded.get(key) != run_settings.get(key)]
        if differing:
            details = ", ".join(f"{key}: {recorded.get(key)!r} there, {run_settings.get(key)!r} now" for key in differing)
            raise InvalidInputError(f"{out_dir} holds an evaluation made with other settings ({details}): "
                                    "pass another --out, or the same settings to resume it")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidInputError(f"{out_dir} is not empty and holds no {RUN_FILE}: pass an empty or new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(run_file, {"format": RUN_FORMAT, "settings": run_settings})


def generate_missing(session, prompts: list[str], seed: int, rounds: int, settings, out_dir: Path, rows: dict,
                     quiet: bool = False) -> int:
    """Make every image of rounds 0..rounds not yet in `rows`; each is saved and recorded as soon as it exists."""
    from tqdm.auto import tqdm

    missing = [(i, r) for i in range(len(prompts)) for r in range(rounds + 1) if (i, r) not in rows]
    if not missing:
        return 0
    bar = tqdm(total=len(missing), desc="generating", unit="image", disable=quiet, file=sys.stderr)
    generated = 0
    for index, prompt in enumerate(prompts):
        previous: Image.Image | None = None
        for round_index in range(rounds + 1):
            if (index, round_index) in rows:
                previous = None  # read from disk only if a later round needs it
                continue
            seed_i = prompt_seed(seed, index)
            if round_index == 0:
                image = session.generate(prompt, seed_i, settings).image
            else:
                if previous is None:
                    previous = read_image(out_dir, rows[(index, round_index - 1)]["image"])
                image = session.refine(previous, prompt, seed_i, critique=None, settings=settings, index=round_index).image
            name = image_name(index, round_index)
            save_image_atomically(image, out_dir / name)
            row = {"prompt_index": index, "prompt": prompt, "seed": seed_i, "round": round_index, "image": name,
                   "scores": {}}
            append_result(out_dir, row)
            rows[(index, round_index)] = row
            previous = image
            generated += 1
            bar.update(1)
    bar.close()
    return generated


def _tiny_root(session) -> Path | None:
    """The tiny models folder the session uses (tiny presets), for the tiny stand-ins of the scorers."""
    return ensure_tiny_models(session.tiny_root) if session.base_preset.is_tiny else None


def score_missing(session, scorer_names: list[str], prompts: list[str], rounds: int, out_dir: Path, rows: dict,
                  batch_size: int, quiet: bool = False) -> int:
    """Score every (prompt, round) image a scorer has not scored yet; one scorer's weights resident at a time."""
    from tqdm.auto import tqdm

    from img_core.evaluation.scorers import (
        VQA_SCORER,
        load_scorer,
        scorer_needs_own_weights,
    )

    keys = [(i, r) for i in range(len(prompts)) for r in range(rounds + 1)]
    # the session's own MLLM scores first, while it is loaded; then it goes too
    ordered = sorted(scorer_names, key=lambda name: name != VQA_SCORER)
    scored = 0
    for name in ordered:
        pending = [key for key in keys if name not in rows[key]["scores"]]
        if not pending:
            continue
        uses_critic = not scorer_needs_own_weights(name)
        # free what this scorer does not use, so its weights load into that memory
        session.unload(["diffusion", "aligner"] if uses_critic else list(SESSION_PARTS))
        if uses_critic:
            session.load(["mllm"])
        scorer = load_scorer(name, device=session.device, tiny_root=_tiny_root(session),
                             critic=session.critic if uses_critic else None,
                             quantization=session.quantization)
        bar = tqdm(total=len(pending), desc=f"scoring {name}", unit="image", disable=quiet, file=sys.stderr)
        last_save = time.monotonic()
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            images = [read_image(out_dir, rows[key]["image"]) for key in batch]
            values = scorer.score(images, [rows[key]["prompt"] for key in batch])
            for key, value in zip(batch, values):
                rows[key]["scores"][name] = value
            scored += len(batch)
            bar.update(len(batch))
            if time.monotonic() - last_save > SAVE_EVERY_SECONDS:
                write_results(out_dir, rows)
                last_save = time.monotonic()
        bar.close()
        write_results(out_dir, rows)
        scorer.unload()
    return scored


# ---------------------------------------------------------------------------------------- the files


def write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def save_image_atomically(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def read_image(out_dir: Path, name: str) -> Image.Image:
    path = out_dir / name
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{path} is damaged ({error}): delete it and rerun to make it again") from error


def append_result(out_dir: Path, row: dict) -> None:
    with (out_dir / RESULTS_FILE).open("a") as file:
        file.write(json.dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


def write_results(out_dir: Path, rows: dict) -> None:
    temporary = out_dir / f".{RESULTS_FILE}.tmp"
    with temporary.open("w") as file:
        for key in sorted(rows):
            file.write(json.dumps(rows[key]) + "\n")
    os.replace(temporary, out_dir / RESULTS_FILE)


def read_results(out_dir: Path) -> dict[tuple[int, int], dict]:
    """The rows of results.jsonl by (prompt_index, round). A cut-off last line (an interrupted write) and
    rows whose image is gone are dropped (they are made again), as are later rounds of that prompt, which
    were made from it; any other damage, or a non-finite score, is an error."""
    path = out_dir / RESULTS_FILE
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    rows: dict[tuple[int, int], dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (int(row["prompt_index"]), int(row["round"]))
            scores = row["scores"]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values()):
                raise ValueError(f"non-finite or non-numeric score in {scores}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            if number == len(lines) and isinstance(error, json.JSONDecodeError):
                logger.warning("%s: last line is cut off (interrupted run); its image is made again", path)
                continue
            raise InvalidInputError(f"{path} line {number} is damaged ({error}): fix or delete that line") from error
        rows[key] = row
    complete: dict[tuple[int, int], dict] = {}
    for index in sorted({i for i, _ in rows}):
        round_index = 0
        while (index, round_index) in rows and (out_dir / rows[(index, round_index)]["image"]).is_file():
            complete[(index, round_index)] = rows[(index, round_index)]
            round_index += 1
    if len(complete) < len(rows):
        logger.warning("%s: %d rows lost their image (or an earlier round's); they are made again",
                       path, len(rows) - len(complete))
    return complete


# -------------------------------------------------------------------------------------------- numbers


def win_rate(scores: np.ndarray, base: np.ndarray) -> float:
    """Share of prompts where `scores` beats `base`; a tie counts one half. Both (P,)."""
    return float(np.mean((scores > base) + 0.5 * (scores == base)))


def bootstrap_interval(outcomes: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """95 % percentile interval of the mean of `outcomes` (P,) over prompt resamples with replacement."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(outcomes), size=(resamples, len(outcomes)))  # (R, P)
    means = outcomes[indices].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def score_matrix(rows: dict, prompt_indices, rounds: int, scorer: str) -> tuple[list[int], np.ndarray]:
    """Those of `prompt_indices` with a `scorer` score in every round 0..rounds, and their scores (P, rounds + 1)."""
    indices, matrix = [], []
    for index in prompt_indices:
        keys = [(index, r) for r in range(rounds + 1)]
        if all(key in rows and scorer in rows[key]["scores"] for key in keys):
            indices.append(index)
            matrix.append([rows[key]["scores"][scorer] for key in keys])
    return indices, np.asarray(matrix, dtype=np.float64).reshape(len(indices), rounds + 1)


def summarize(rows: dict, prompt_count: int, rounds: int, scorer_names: list[str], settings: dict,
              categories: list[str | None] | None = None) -> dict:
    """summary.json: per scorer the mean per round, win rate of each round over round 0 and its ci95.
    With `categories` (one per prompt, e.g. from a .txt with `# category:` lines) the same numbers per
    category go under "categories" (without intervals)."""
    complete = sum(all((i, r) in rows for r in range(rounds + 1)) for i in range(prompt_count))
    summary = {"n_prompts": complete, "rounds": rounds, "scorers": _scorer_numbers(rows, range(prompt_count), rounds,
                                                                                  scorer_names, with_interval=True),
               "settings": settings}
    named = sorted({c for c in categories or [] if c is not None})
    if named:
        summary["categories"] = {
            category: _scorer_numbers(rows, [i for i, c in enumerate(categories) if c == category], rounds,
                                      scorer_names, with_interval=False)
            for category in named
        }
    return summary


def _scorer_numbers(rows: dict, prompt_indices, rounds: int, scorer_names: list[str], with_interval: bool) -> dict:
    numbers = {}
    for name in scorer_names:
        indices, matrix = score_matrix(rows, prompt_indices, rounds, name)
        entry = {"n_prompts": len(indices), "mean": [None] * (rounds + 1), "win_rate": [None] * (rounds + 1)}
        if with_interval:
            entry["ci95"] = [None] * (rounds + 1)
        if indices:
            entry["mean"] = [float(value) for value in matrix.mean(axis=0)]
            for k in range(1, rounds + 1):
                outcomes = (matrix[:, k] > matrix[:, 0]) + 0.5 * (matrix[:, k] == matrix[:, 0])  # (P,)
                entry["win_rate"][k] = win_rate(matrix[:, k], matrix[:, 0])
                if with_interval:
                    entry["ci95"][k] = bootstrap_interval(outcomes.astype(np.float64))
        numbers[name] = entry
    return numbers


def format_summary(summary: dict) -> str:
    lines = [f"{summary['n_prompts']} prompts, rounds 0..{summary['rounds']}",
             f"{'scorer':<14}{'round':>6}{'mean':>11}{'win rate':>10}  ci95"]
    for name, entry in summary["scorers"].items():
        for k, mean in enumerate(entry["mean"]):
            rate = entry["win_rate"][k]
            interval = entry["ci95"][k]
            lines.append(
                f"{name:<14}{k:>6}{_number(mean):>11}{format_percent(rate):>10}  "
                + (f"[{format_percent(interval[0])}, {format_percent(interval[1])}]" if interval else "")
            )
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -------------------------------------------------------------------------------------------- report


def write_report(out_dir: Path, rows: dict, summary: dict, prompts: list[str]) -> Path:
    """report.html: summary table, one SVG plot of mean score per round per scorer, and the image grid."""
    rounds = summary["rounds"]
    scorers = list(summary["scorers"])
    first = scorers[0] if scorers else None
    settings = summary["settings"]
    head_cells = "".join(f"<th>round {k}</th>" for k in range(rounds + 1))
    grid_rows = []
    for index, prompt in enumerate(prompts):
        keys = [(index, k) for k in range(rounds + 1)]
        best = None
        if first and all(key in rows and first in rows[key]["scores"] for key in keys):
            values = [rows[key]["scores"][first] for key in keys]
            best = int(np.argmax(values))  # the earliest of equal bests
        cells = []
        for k, key in enumerate(keys):
            row = rows.get(key)
            if row is None:
                cells.append('<td class="missing">not made</td>')
                continue
            scores = "<br>".join(f"{html.escape(name)} {row['scores'][name]:.4f}" for name in scorers
                                 if name in row["scores"])
            mark = '<div class="badge">best</div>' if k == best else ""
            cells.append(f'<td class="{"best" if k == best else "cell"}"><a href="{html.escape(row["image"])}">'
                         f'<img src="{html.escape(row["image"])}" alt="prompt {index} round {k}" loading="lazy"></a>'
                         f'{mark}<div class="scores">{scores}</div></td>')
        grid_rows.append(f"<tr><td class=\"prompt\"><b>{index}</b> {html.escape(prompt)}</td>{''.join(cells)}</tr>")
    table_rows = []
    for name, entry in summary["scorers"].items():
        for k in range(rounds + 1):
            interval = entry["ci95"][k]
            table_rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{k}</td><td>{_number(entry['mean'][k])}</td>"
                f"<td>{format_percent(entry['win_rate'][k])}</td>"
                f"<td>{'' if not interval else f'[{format_percent(interval[0])}, {format_percent(interval[1])}]'}</td></tr>"
            )
    plots = "".join(_mean_plot(name, entry["mean"]) for name, entry in summary["scorers"].items())
    described = ", ".join(f"{key} {html.escape(str(value))}" for key, value in settings.items()
                          if key in ("preset", "prompts", "seed", "guidance_mode", "aligner", "mllm", "steps")
                          and value is not None)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>IMG evaluation: {html.escape(str(settings.get('preset')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 6px; vertical-align: top; font-size: 13px; }}
.summary td {{ text-align: right; }}
.grid img {{ width: 160px; height: 160px; object-fit: contain; image-rendering: auto; display: block; }}
.grid td.prompt {{ max-width: 260px; }}
.grid td.best {{ outline: 3px solid #1a7f37; outline-offset: -3px; background: #eefbf1; }}
.badge {{ color: #1a7f37; font-weight: bold; }}
.scores {{ font-family: ui-monospace, monospace; font-size: 12px; }}
.plots svg {{ margin: 0 16px 16px 0; background: #fafafa; border: 1px solid #ddd; }}
</style></head><body>
<h1>IMG evaluation</h1>
<p>{summary['n_prompts']} prompts, rounds 0..{rounds}; {described}. Win rate: share of prompts whose round-k
score beats round 0 (ties count one half), 95 % bootstrap interval over prompts. Best round by {html.escape(str(first))}.</p>
<h2>Mean score per round</h2>
<div class="plots">{plots}</div>
<h2>Summary</h2>
<table class="summary"><tr><th>scorer</th><th>round</th><th>mean</th><th>win rate</th><th>ci95</th></tr>
{''.join(table_rows)}</table>
<h2>Images</h2>
<table class="grid"><tr><th>prompt</th>{head_cells}</tr>
{''.join(grid_rows)}</table>
</body></html>
"""
    path = out_dir / REPORT_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
    return path


def _mean_plot(name: str, means: list) -> str:
    """An inline SVG line plot of the mean score per round."""
    width, height, margin = 320, 200, 40
    points = [(k, value) for k, value in enumerate(means) if value is not None]
    if not points:
        return ""
    low, high = min(v for _, v in points), max(v for _, v in points)
    if high - low < 1e-12:
        low, high = low - 1, high + 1
    span_x = max(len(means) - 1, 1)

    def position(k: int, value: float) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * k / span_x
        y = height - margin - (height - 2 * margin) * (value - low) / (high - low)
        return x, y

    coordinates = [position(k, v) for k, v in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
    marks = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#1f6feb"/>'
        f'<text x="{x:.1f}" y="{y - 8:.1f}" font-size="11" text-anchor="middle">{v:.3f}</text>'
        for (x, y), (_, v) in zip(coordinates, points)
    )
    ticks = "".join(
        f'<text x="{position(k, low)[0]:.1f}" y="{height - margin + 16}" font-size="11" text-anchor="middle">{k}</text>'
        for k in range(len(means))
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="mean {html.escape(name)} per round">'
        f'<text x="{width / 2}" y="18" font-size="13" text-anchor="middle">mean {html.escape(name)}</text>'
        f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="#888"/>'
        f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="#888"/>'
        f'<polyline points="{line}" fill="none" stroke="#1f6feb" stroke-width="2"/>{marks}{ticks}'
        f'<text x="{width / 2}" y="{height - 6}" font-size="11" text-anchor="middle">round</text></svg>'
    )


# ------------------------------------------------------------------------------------------- compare


def compare_runs(dir_a: Path, dir_b: Path) -> list[dict]:
    """One row per scorer and round both runs hold: n shared prompts, mean A, mean B, win rate of A over B.
    Prompts are matched by their text (the first occurrence of a repeated prompt)."""

    def by_prompt(out_dir: Path) -> dict[str, dict[int, dict]]:
        if not (out_dir / RESULTS_FILE).is_file():
            raise InvalidInputError(f"{out_dir} holds no {RESULTS_FILE}: pass a folder written by evaluate")
        table: dict[str, dict[int, dict]] = {}
        first_index: dict[str, int] = {}
        for (index, round_index), row in sorted(read_results(out_dir).items()):
            if first_index.setdefault(row["prompt"], index) == index:
                table.setdefault(row["prompt"], {})[round_index] = row["scores"]
        return table

    a, b = by_prompt(dir_a), by_prompt(dir_b)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise InvalidInputError(f"{dir_a} and {dir_b} share no prompt: nothing to compare")
    rounds = sorted({k for p in shared for k in a[p]} & {k for p in shared for k in b[p]})
    scorers = sorted({s for p in shared for r in a[p].values() for s in r} & {s for p in shared for r in b[p].values() for s in r})
    table = []
    for scorer in scorers:
        for k in rounds:
            pairs = [(a[p][k][scorer], b[p][k][scorer]) for p in shared
                     if scorer in a[p].get(k, {}) and scorer in b[p].get(k, {})]
            if not pairs:
                continue
            values = np.asarray(pairs, dtype=np.float64)  # (P, 2)
            table.append({"scorer": scorer, "round": k, "n": len(pairs), "mean_a": float(values[:, 0].mean()),
                          "mean_b": float(values[:, 1].mean()), "win_rate_a": win_rate(values[:, 0], values[:, 1])})
    return table
