"""`python -m img_core evaluate`: the paper's win-rate protocol on a prompt set, and `evaluate-compare`.

    python -m img_core evaluate --preset sdxl --prompts hpd_test.json --rounds 1 --scorers hpsv2 --out runs/sdxl
    accelerate launch --multi_gpu --num_processes 8 -m img_core evaluate ...   # prompts split over 8 GPUs
    python -m img_core evaluate-compare runs/question runs/dialogue

For every prompt i and seed index j < --seeds (seed = --seed + i + j * SEED_STRIDE): round 0 is the base
model's image, rounds 1..N are IMG rounds, each from the previous image, as `refine` makes them. The prompt
is the unit of every statistic; its seeds are averaged. The folder DIR then holds

    DIR/images/{i:05d}_r{round}.png     (seed index 0; seed index j > 0: {i:05d}_s{j}_r{round}.png)
    DIR/results.jsonl    one line per prompt, seed and round: prompt_index, seed_index, prompt, seed, round,
                         image, scores
    DIR/summary.json     per scorer: mean per round, win rate of round k over round 0 (ties count one half)
                         with its 95 % interval (Wilson by default, see img_core.evaluation.statistics), the
                         mean score difference to round 0 with a paired bootstrap interval; the same per
                         category for prompt files with `# category:` lines; what each scorer is (for
                         VQAScore: the judge, and whether it is the guidance MLLM: `self_judged`)
    DIR/report.html      summary, plots of the mean per round with intervals, a sortable per-prompt table and
                         the prompts x rounds grid; it links the PNGs under images/ and needs no server
    DIR/run.json         the settings that made the images, including the question source actually used

Steps, as the code runs them:
    1. check the arguments and read the prompt set (nothing loads before that)
    2. refuse DIR if it holds images made with other settings (naming each difference); read what is there
    3. generate the missing images (round by round, each saved and recorded at once: an interrupted run
       resumes where it stopped and generates nothing twice)
    4. free the diffusion pipeline and aligner (and the MLLM, unless a self-judged VQAScore uses it), then
       load one scorer at a time, score what it has not scored yet, and free it: one large model set at a time
    5. write summary.json and report.html, print the table

Under `accelerate launch` (several processes, on one machine or many sharing DIR) the prompts are split
between the processes with accelerate's `PartialState.split_between_processes`; each process writes its
rows to DIR/shards/results.{rank}.jsonl, and after all have finished, the main process merges the shards and
what was there into results.jsonl (the same file one process writes), removes the shards and writes the
summary and report. An interrupted multi-process run resumes from results.jsonl and whatever shards are left,
with any number of processes. On CPUs (tests): ACCELERATE_USE_CPU=1 with `accelerate launch --multi_gpu
--num_processes 2` or `torchrun --nproc_per_node 2` (accelerate 1.x's `launch --cpu` starts one process
unless given an MPI hostfile).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from img_core.evaluation.prompt_sets import load_prompt_set
from img_core.evaluation.scorers import (
    check_scorer_names,
    describe_scorer,
    load_scorer,
    scorer_needs_own_weights,
)
from img_core.evaluation.statistics import (
    DEFAULT_INTERVAL_METHOD,
    bootstrap_interval,
    check_interval_method,
    win_outcomes,
    win_rate_interval,
)
from img_core.presets import default_preset_name, get_preset
from img_core.questions import load_question_source
from img_core.session import SESSION_PARTS, IMGSession
from img_core.settings import (
    check_rounds,
    check_seed,
    model_options_from_args,
    round_settings_from_args,
)
from img_core.tiny.models import ensure_tiny_models

logger = logging.getLogger(__name__)

RUN_FORMAT = "img-evaluate/2"
RESULTS_FILE = "results.jsonl"
SHARDS_DIR = "shards"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
RUN_FILE = "run.json"
IMAGES_DIR = "images"
DEFAULT_SCORERS = "hpsv2"
DEFAULT_SCORE_BATCH = 8
SEED_STRIDE = 1_000_000  # seed index j of prompt i uses seed + i + j * SEED_STRIDE: no two samples share a seed
SAVE_EVERY_SECONDS = 30.0  # how often scores are written back while a long scoring pass runs
# Settings that change the images: a folder made with other values is refused. --rounds, --limit and
# --scorers may change between runs (more rounds, prompts or scorers are added to what is there).
IMAGE_SETTINGS = ("preset", "prompts_sha256", "seed", "seeds", "steps", "guidance_scale", "ip_scale",
                  "aligner_passes", "guidance_mode", "max_critique_tokens", "questions", "questions_used",
                  "questions_sha256", "aligner", "mllm", "no_critique", "quantization", "diffusion_quantization")


def image_name(prompt_index: int, round_index: int, seed_index: int = 0) -> str:
    seed_part = f"_s{seed_index}" if seed_index else ""
    return f"{IMAGES_DIR}/{prompt_index:05d}{seed_part}_r{round_index}.png"


def prompt_seed(seed: int, prompt_index: int, seed_index: int = 0) -> int:
    """Each (prompt, seed index) has its own seed; its base image and all its IMG rounds share it (REFERENCE §4)."""
    return seed + prompt_index + seed_index * SEED_STRIDE


# ------------------------------------------------------------------------------------------- arguments


@dataclass
class EvaluationResult:
    out_dir: Path
    generated: int  # images made by this process
    scored: int  # (image, scorer) pairs scored by this process
    summary: dict | None  # None on the processes other than the main one


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Cheap checks before anything loads; returns the scorer names."""

    if check_rounds(args.rounds) < 1:
        raise InvalidInputError("--rounds must be at least 1: the win rates compare rounds >= 1 with round 0")
    if args.limit is not None and args.limit < 1:
        raise InvalidInputError(f"--limit must be >= 1, got {args.limit}")
    if args.score_batch < 1:
        raise InvalidInputError(f"--score-batch must be >= 1, got {args.score_batch}")
    if args.seeds < 1:
        raise InvalidInputError(f"--seeds must be >= 1, got {args.seeds}")
    check_seed(args.seed)
    check_seed(args.seed + (args.seeds - 1) * SEED_STRIDE)
    check_interval_method(args.interval)
    return check_scorer_names(args.scorers.split(","))


def question_record(requested: str) -> dict:
    """The question source a run actually asks (offline, "release" falls back to ours): its name, the sha256
    of its templates and, when it is not what was asked for, a note saying so."""

    source = load_question_source(requested)
    digest = hashlib.sha256(json.dumps(list(source.templates)).encode("utf-8")).hexdigest()
    fallback = None
    if source.name != requested:
        fallback = (f"asked for {requested!r}, which could not be read here (offline and not cached); "
                    f"{source.name!r} was used instead")
        logger.warning("questions: %s", fallback)
    return {"questions_used": source.name, "questions_sha256": digest, "questions_origin": source.origin,
            "questions_fallback": fallback}


# ------------------------------------------------------------------------------------------ the run


def run_evaluation(args: argparse.Namespace) -> EvaluationResult:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # 1. arguments and prompts (the same settings and checks as `refine`)
    scorer_names = check_arguments(args)
    settings = round_settings_from_args(args)
    options = model_options_from_args(args)
    preset_name = options.preset or default_preset_name()
    preset = get_preset(preset_name)
    resolved = settings.resolve(preset)
    prompt_set = load_prompt_set(args.prompts, column=args.prompt_column, split=args.prompt_split)
    prompts = prompt_set.prompts[: args.limit] if args.limit else prompt_set.prompts
    # one process unless started by `accelerate launch` / torchrun; ACCELERATE_USE_CPU=1 splits on CPUs (gloo)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    requested_questions = options.questions or preset.questions
    guidance_mllm = options.mllm or preset.mllm
    tiny_root = _preset_tiny_root(preset)
    run_settings = {
        "preset": preset_name, "prompts": prompt_set.source, "prompts_sha256": prompt_set.sha256,
        "prompt_count": len(prompt_set.prompts), "seed": args.seed, "seeds": args.seeds, "steps": resolved.steps,
        "guidance_scale": resolved.guidance_scale, "ip_scale": resolved.ip_scale,
        "aligner_passes": resolved.aligner_passes, "guidance_mode": resolved.guidance_mode,
        "max_critique_tokens": resolved.max_critique_tokens, "questions": requested_questions,
        **question_record(requested_questions),
        "aligner": options.aligner, "mllm": options.mllm, "no_critique": not resolved.critique,
        "quantization": options.quantization, "diffusion_quantization": options.diffusion_quantization,
        "rounds": args.rounds, "limit": args.limit, "scorers": scorer_names, "interval": args.interval,
        "scorer_details": {name: describe_scorer(name, guidance_mllm, tiny_root) for name in scorer_names},
    }

    # 2. the folder: refuse other settings, read what is there (the main process writes run.json)
    out_dir = Path(args.out)
    if state.is_main_process:
        check_run_folder(out_dir, run_settings)
        (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        check_run_folder(out_dir, run_settings, write=False)
    rows = read_results(out_dir)
    samples = [(i, j) for i in range(len(prompts)) for j in range(args.seeds)]
    with state.split_between_processes(list(range(len(prompts)))) as my_prompts:
        mine = [(i, j) for i, j in samples if i in set(my_prompts)]
    shard = out_dir / RESULTS_FILE if state.num_processes == 1 else out_dir / SHARDS_DIR / f"results.{state.process_index:03d}.jsonl"
    shard.parent.mkdir(parents=True, exist_ok=True)
    my_rows = {key: row for key, row in rows.items() if key[:2] in set(mine)}

    # 3. generation
    session_options = options
    if state.num_processes > 1 and options.device is None:  # one GPU per process
        session_options = dataclasses.replace(options, device="cpu" if state.device.type == "cpu" else str(state.device))
    session = IMGSession(session_options, show_progress_bars=False)
    generated = generate_missing(session, prompts, mine, args.seed, args.rounds, settings, out_dir, my_rows, shard,
                                 quiet=args.quiet)

    # 4. scoring, one model set at a time
    scored = score_missing(session, scorer_names, mine, args.rounds, out_dir, my_rows, shard, args.score_batch,
                           args.quiet)

    # 5. merge, summary and report (the main process, once every process has written its shard)
    state.wait_for_everyone()
    state.destroy_process_group()  # the gloo/NCCL group ends here: left to interpreter exit it can abort a rank (SIGABRT)
    if not state.is_main_process:
        return EvaluationResult(out_dir, generated, scored, None)
    rows = read_results(out_dir)
    write_results(out_dir / RESULTS_FILE, rows)
    for leftover in sorted((out_dir / SHARDS_DIR).glob("results.*.jsonl")):
        leftover.unlink()
    categories = prompt_set.categories[: len(prompts)]
    summary = summarize(rows, len(prompts), args.rounds, scorer_names, run_settings, categories,
                        seeds=args.seeds, interval=args.interval)
    write_json_atomically(out_dir / SUMMARY_FILE, summary)
    write_report(out_dir, rows, summary, prompts)
    return EvaluationResult(out_dir, generated, scored, summary)


def check_run_folder(out_dir: Path, run_settings: dict, write: bool = True) -> None:
    """Record the settings in a new folder; refuse a folder made with settings that change the images, or
    whose scorers were defined otherwise (another VQAScore judge), naming each difference."""
    run_file = out_dir / RUN_FILE
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text())["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InvalidInputError(f"{run_file} is damaged ({error}): pass another --out") from error
        differing = [(key, recorded.get(key), run_settings.get(key)) for key in IMAGE_SETTINGS
                     if recorded.get(key) != run_settings.get(key)]
        recorded_scorers = recorded.get("scorer_details") or {}
        differing += [(f"scorer {name}", recorded_scorers[name], details)
                      for name, details in run_settings.get("scorer_details", {}).items()
                      if name in recorded_scorers and recorded_scorers[name] != details]
        if differing:
            details = ", ".join(f"{key}: {there!r} there, {now!r} now" for key, there, now in differing)
            raise InvalidInputError(f"{out_dir} holds an evaluation made with other settings ({details}): "
                                    "pass another --out, or the same settings to resume it")
        if write:
            merged = dict(run_settings)
            merged["scorer_details"] = {**recorded_scorers, **run_settings.get("scorer_details", {})}
            write_json_atomically(run_file, {"format": RUN_FORMAT, "settings": merged})
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidInputError(f"{out_dir} is not empty and holds no {RUN_FILE}: pass an empty or new --out")
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(run_file, {"format": RUN_FORMAT, "settings": run_settings})


def generate_missing(session, prompts: list[str], samples: list[tuple[int, int]], seed: int, rounds: int, settings,
                     out_dir: Path, rows: dict, results_path: Path, quiet: bool = False) -> int:
    """Make every image of rounds 0..rounds of `samples` (prompt index, seed index) not yet in `rows`; each is
    saved and recorded (appended to `results_path`) as soon as it exists."""
    from tqdm.auto import tqdm

    missing = [(i, j, r) for i, j in samples for r in range(rounds + 1) if (i, j, r) not in rows]
    if not missing:
        return 0
    bar = tqdm(total=len(missing), desc="generating", unit="image", disable=quiet, file=sys.stderr)
    generated = 0
    for index, seed_index in samples:
        prompt = prompts[index]
        previous: Image.Image | None = None
        for round_index in range(rounds + 1):
            key = (index, seed_index, round_index)
            if key in rows:
                previous = None  # read from disk only if a later round needs it
                continue
            seed_i = prompt_seed(seed, index, seed_index)
            if round_index == 0:
                image = session.generate(prompt, seed_i, settings).image
            else:
                if previous is None:
                    previous = read_image(out_dir, rows[(index, seed_index, round_index - 1)]["image"])
                image = session.refine(previous, prompt, seed_i, critique=None, settings=settings, index=round_index).image
            name = image_name(index, round_index, seed_index)
            save_image_atomically(image, out_dir / name)
            row = {"prompt_index": index, "seed_index": seed_index, "prompt": prompt, "seed": seed_i,
                   "round": round_index, "image": name, "scores": {}}
            append_result(results_path, row)
            rows[key] = row
            previous = image
            generated += 1
            bar.update(1)
    bar.close()
    return generated


def _tiny_root(session) -> Path | None:
    """The tiny models folder the session uses (tiny presets), for the tiny stand-ins of the scorers."""
    return ensure_tiny_models(session.tiny_root) if session.base_preset.is_tiny else None


def _preset_tiny_root(preset) -> Path | None:
    """The tiny models' folder for a tiny preset (where its judges and scorers live), else None."""
    if not preset.is_tiny:
        return None
    return ensure_tiny_models()


def score_missing(session, scorer_names: list[str], samples: list[tuple[int, int]], rounds: int, out_dir: Path,
                  rows: dict, results_path: Path, batch_size: int, quiet: bool = False) -> int:
    """Score every image of `samples` a scorer has not scored yet; one scorer's weights resident at a time."""
    from tqdm.auto import tqdm


    keys = [(i, j, r) for i, j in samples for r in range(rounds + 1)]
    tiny_root = _tiny_root(session)
    guidance = session.mllm_name

    def uses_critic(name: str) -> bool:
        return not scorer_needs_own_weights(name, guidance, tiny_root)

    # a self-judged VQAScore runs first, while the session's MLLM is loaded; then it goes too
    ordered = sorted(scorer_names, key=lambda name: not uses_critic(name))
    scored = 0
    for name in ordered:
        pending = [key for key in keys if name not in rows[key]["scores"]]
        if not pending:
            continue
        keep_critic = uses_critic(name)
        # free what this scorer does not use, so its weights load into that memory
        session.unload(["diffusion", "aligner"] if keep_critic else list(SESSION_PARTS))
        if keep_critic:
            session.load(["mllm"])
        scorer = load_scorer(name, device=session.device, tiny_root=tiny_root,
                             critic=session.critic if keep_critic else None,
                             quantization=session.quantization, guidance_mllm=guidance)
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
                write_results(results_path, rows)
                last_save = time.monotonic()
        bar.close()
        write_results(results_path, rows)
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


def append_result(results_path: Path, row: dict) -> None:
    with results_path.open("a") as file:
        file.write(json.dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


def write_results(results_path: Path, rows: dict) -> None:
    """All `rows`, sorted by (prompt, seed index, round), written atomically to `results_path`."""
    temporary = results_path.with_name(f".{results_path.name}.tmp")
    with temporary.open("w") as file:
        for key in sorted(rows):
            file.write(json.dumps(rows[key]) + "\n")
    os.replace(temporary, results_path)


def read_results(out_dir: Path) -> dict[tuple[int, int, int], dict]:
    """The rows of results.jsonl and of any shards left by a multi-process run, by (prompt_index, seed_index,
    round); a shard's row replaces results.jsonl's (it is newer). A cut-off last line (an interrupted write)
    and rows whose image is gone are dropped (they are made again), as are later rounds of that sample,
    which were made from it; any other damage, or a non-finite score, is an error."""
    rows: dict[tuple[int, int, int], dict] = {}
    for path in [out_dir / RESULTS_FILE, *sorted((out_dir / SHARDS_DIR).glob("results.*.jsonl"))]:
        if path.is_file():
            for key, row in _read_rows_file(path).items():
                if key in rows and path.name != RESULTS_FILE:
                    row["scores"] = {**rows[key]["scores"], **row["scores"]}
                rows[key] = row
    complete: dict[tuple[int, int, int], dict] = {}
    for sample in sorted({key[:2] for key in rows}):
        round_index = 0
        while (*sample, round_index) in rows and (out_dir / rows[(*sample, round_index)]["image"]).is_file():
            complete[(*sample, round_index)] = rows[(*sample, round_index)]
            round_index += 1
    if len(complete) < len(rows):
        logger.warning("%s: %d rows lost their image (or an earlier round's); they are made again",
                       out_dir, len(rows) - len(complete))
    return complete


def _read_rows_file(path: Path) -> dict[tuple[int, int, int], dict]:
    lines = path.read_text().splitlines()
    rows: dict[tuple[int, int, int], dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row.setdefault("seed_index", 0)  # rows of img-evaluate/1 folders have one seed per prompt
            key = (int(row["prompt_index"]), int(row["seed_index"]), int(row["round"]))
            scores = row["scores"]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values()):
                raise ValueError(f"non-finite or non-numeric score in {scores}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            if number == len(lines) and isinstance(error, json.JSONDecodeError):
                logger.warning("%s: last line is cut off (interrupted run); its image is made again", path)
                continue
            raise InvalidInputError(f"{path} line {number} is damaged ({error}): fix or delete that line") from error
        rows[key] = row
    return rows


# -------------------------------------------------------------------------------------------- numbers


def win_rate(scores: np.ndarray, base: np.ndarray) -> float:
    """Share of prompts where `scores` beats `base`; a tie counts one half. Both (P,) or (P, S) (S seeds:
    each prompt's outcome is the mean over its seeds)."""
    scores, base = np.asarray(scores, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if scores.ndim == 1:
        scores, base = scores[:, None], base[:, None]
    return float(win_outcomes(scores, base).mean())


def score_matrix(rows: dict, prompt_indices, rounds: int, scorer: str, seeds: int = 1) -> tuple[list[int], np.ndarray]:
    """Those of `prompt_indices` with a `scorer` score for every seed index and round, and their scores
    (P, seeds, rounds + 1)."""
    indices, matrix = [], []
    for index in prompt_indices:
        keys = [[(index, j, r) for r in range(rounds + 1)] for j in range(seeds)]
        if all(key in rows and scorer in rows[key]["scores"] for per_seed in keys for key in per_seed):
            indices.append(index)
            matrix.append([[rows[key]["scores"][scorer] for key in per_seed] for per_seed in keys])
    return indices, np.asarray(matrix, dtype=np.float64).reshape(len(indices), seeds, rounds + 1)


def summarize(rows: dict, prompt_count: int, rounds: int, scorer_names: list[str], settings: dict,
              categories: list[str | None] | None = None, seeds: int = 1,
              interval: str = DEFAULT_INTERVAL_METHOD) -> dict:
    """summary.json: per scorer the mean per round, the win rate of each round over round 0 with its 95 %
    interval (`interval` method), and the mean difference to round 0 with a paired bootstrap interval. With
    `categories` (one per prompt, e.g. from a .txt with `# category:` lines) the same numbers per category go
    under "categories". "judges" says which MLLM judged each VQAScore and whether it is self-judged."""
    complete = sum(all((i, j, r) in rows for j in range(seeds) for r in range(rounds + 1)) for i in range(prompt_count))
    details = settings.get("scorer_details", {})
    summary = {"n_prompts": complete, "seeds": seeds, "rounds": rounds, "interval": interval,
               "scorers": _scorer_numbers(rows, range(prompt_count), rounds, scorer_names, seeds, interval),
               "judges": {name: {"judge": entry["judge"], "self_judged": entry["self_judged"]}
                          for name, entry in details.items() if "judge" in entry},
               "settings": settings}
    summary["self_judged"] = any(entry["self_judged"] for entry in summary["judges"].values())
    named = sorted({c for c in categories or [] if c is not None})
    if named:
        summary["categories"] = {
            category: _scorer_numbers(rows, [i for i, c in enumerate(categories) if c == category], rounds,
                                      scorer_names, seeds, interval)
            for category in named
        }
    return summary


def _scorer_numbers(rows: dict, prompt_indices, rounds: int, scorer_names: list[str], seeds: int,
                    interval: str) -> dict:
    numbers = {}
    for name in scorer_names:
        indices, matrix = score_matrix(rows, prompt_indices, rounds, name, seeds)  # (P, S, R + 1)
        empty = [None] * (rounds + 1)
        entry = {"n_prompts": len(indices), "mean": list(empty), "win_rate": list(empty), "ci95": list(empty),
                 "mean_difference": list(empty), "mean_difference_ci95": list(empty)}
        if indices:
            entry["mean"] = [float(value) for value in matrix.mean(axis=(0, 1))]
            for k in range(1, rounds + 1):
                outcomes = win_outcomes(matrix[:, :, k], matrix[:, :, 0])  # (P,)
                differences = (matrix[:, :, k] - matrix[:, :, 0]).mean(axis=1)  # (P,): the prompt is the unit
                entry["win_rate"][k] = float(outcomes.mean())
                entry["ci95"][k] = win_rate_interval(outcomes, interval)
                entry["mean_difference"][k] = float(differences.mean())
                entry["mean_difference_ci95"][k] = bootstrap_interval(differences)
        numbers[name] = entry
    return numbers


def format_summary(summary: dict) -> str:
    lines = [f"{summary['n_prompts']} prompts x {summary.get('seeds', 1)} seeds, rounds 0..{summary['rounds']}; "
             f"win-rate interval: {summary.get('interval', 'bootstrap')}, difference: paired bootstrap",
             f"{'scorer':<16}{'round':>6}{'mean':>11}{'win rate':>10}  {'ci95':<17}{'diff':>10}  ci95"]
    for name, entry in summary["scorers"].items():
        for k, mean in enumerate(entry["mean"]):
            lines.append(
                f"{name:<16}{k:>6}{_number(mean):>11}{format_percent(entry['win_rate'][k]):>10}  "
                f"{format_interval(entry['ci95'][k], format_percent):<17}"
                f"{_number(entry.get('mean_difference', [None] * len(entry['mean']))[k]):>10}  "
                f"{format_interval(entry.get('mean_difference_ci95', [None] * len(entry['mean']))[k], _number)}"
            )
    for name, judge in summary.get("judges", {}).items():
        lines.append(f"{name}: judged by {judge['judge']}" + (" (SELF-JUDGED: the guidance MLLM grades its own "
                                                              "work)" if judge["self_judged"] else ""))
    return "\n".join(lines)


def format_interval(interval, formatter) -> str:
    return "" if not interval else f"[{formatter(interval[0])}, {formatter(interval[1])}]"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -------------------------------------------------------------------------------------------- report


PLOT_WIDTH, PLOT_HEIGHT = 360, 230
PLOT_MARGIN = {"left": 62, "right": 16, "top": 28, "bottom": 44}
PLOT_TICKS = 5
SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, column) => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0];
  const ascending = th.dataset.order !== 'ascending';
  table.querySelectorAll('th').forEach(other => delete other.dataset.order);
  th.dataset.order = ascending ? 'ascending' : 'descending';
  const key = row => { const cell = row.cells[column]; const value = cell.dataset.value ?? cell.textContent;
                       const number = parseFloat(value); return isNaN(number) ? value : number; };
  const rows = Array.from(body.rows).sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1); });
  rows.forEach(row => body.appendChild(row));
}));
"""


def write_report(out_dir: Path, rows: dict, summary: dict, prompts: list[str]) -> Path:
    """report.html: summary table, per scorer a plot of the mean per round and one of the win rate (both with
    95 % intervals, axes labelled), a sortable per-prompt table, and the image grid. One file, no server."""
    rounds = summary["rounds"]
    seeds = summary.get("seeds", 1)
    scorers = list(summary["scorers"])
    first = scorers[0] if scorers else None
    settings = summary["settings"]
    interval_name = {"wilson": "Wilson score", "clopper-pearson": "Clopper-Pearson (exact)",
                     "bootstrap": "percentile bootstrap"}.get(summary.get("interval"), "bootstrap")
    head_cells = "".join(f"<th>round {k}</th>" for k in range(rounds + 1))
    grid_rows = []
    for index, prompt in enumerate(prompts):
        for seed_index in range(seeds):
            grid_rows.append(_grid_row(rows, index, seed_index, prompt, rounds, scorers, first))
    table_rows = []
    for name, entry in summary["scorers"].items():
        for k in range(rounds + 1):
            difference = entry.get("mean_difference", [None] * (rounds + 1))[k]
            difference_interval = entry.get("mean_difference_ci95", [None] * (rounds + 1))[k]
            table_rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{k}</td><td>{_number(entry['mean'][k])}</td>"
                f"<td>{format_percent(entry['win_rate'][k])}</td>"
                f"<td>{format_interval(entry['ci95'][k], format_percent)}</td>"
                f"<td>{_number(difference)}</td><td>{format_interval(difference_interval, _number)}</td></tr>"
            )
    plots = "".join(_mean_plot(name, entry) + _win_rate_plot(name, entry) for name, entry in summary["scorers"].items())
    judges = "".join(
        f'<p class="{"warning" if judge["self_judged"] else "judge"}">{html.escape(name)} is judged by '
        f'{html.escape(str(judge["judge"]))}'
        + (": <b>self-judged</b> - the MLLM that wrote the guidance grades its own work.</p>" if judge["self_judged"]
           else ", not the guidance MLLM.</p>")
        for name, judge in summary.get("judges", {}).items()
    )
    questions = ""
    if settings.get("questions_used") is not None:
        questions = (f"<p>Questions asked: {html.escape(str(settings['questions_used']))} "
                     f"(sha256 {html.escape(str(settings.get('questions_sha256', ''))[:12])}...)"
                     + (f"; {html.escape(settings['questions_fallback'])}" if settings.get("questions_fallback") else "")
                     + ".</p>")
    described = ", ".join(f"{key} {html.escape(str(value))}" for key, value in settings.items()
                          if key in ("preset", "prompts", "seed", "guidance_mode", "aligner", "mllm", "steps")
                          and value is not None)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>IMG evaluation: {html.escape(str(settings.get('preset')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 6px; vertical-align: top; font-size: 13px; }}
.summary td, .prompts td {{ text-align: right; }}
.prompts td.text {{ text-align: left; max-width: 360px; }}
table.sortable th {{ cursor: pointer; user-select: none; background: #f3f3f3; }}
table.sortable th[data-order=ascending]::after {{ content: " \\25B2"; }}
table.sortable th[data-order=descending]::after {{ content: " \\25BC"; }}
.grid img {{ width: 160px; height: 160px; object-fit: contain; image-rendering: auto; display: block; }}
.grid td.prompt {{ max-width: 260px; }}
.grid td.best {{ outline: 3px solid #1a7f37; outline-offset: -3px; background: #eefbf1; }}
.badge {{ color: #1a7f37; font-weight: bold; }}
.scores {{ font-family: ui-monospace, monospace; font-size: 12px; }}
.plots svg {{ margin: 0 16px 16px 0; background: #fafafa; border: 1px solid #ddd; }}
.warning {{ background: #fff4e5; border-left: 4px solid #d97706; padding: 6px 10px; }}
</style></head><body>
<h1>IMG evaluation</h1>
<p>{summary['n_prompts']} prompts x {seeds} seed(s), rounds 0..{rounds}; {described}. Win rate: share of prompts
whose round-k score beats round 0 (ties count one half; a prompt's seeds are averaged), with its 95 %
{interval_name} interval over prompts. Difference: mean of round k minus round 0, 95 % paired bootstrap
interval over prompts. Best round by {html.escape(str(first))}.</p>
{judges}{questions}
<h2>Per round</h2>
<p>Left: mean score (error bars: round 0's mean plus the paired interval of the difference). Right: win rate
over round 0 on a fixed 0-100 % scale (error bars: its interval; dashed: 50 %).</p>
<div class="plots">{plots}</div>
<h2>Summary</h2>
<table class="summary"><tr><th>scorer</th><th>round</th><th>mean</th><th>win rate</th><th>ci95</th>
<th>difference</th><th>ci95</th></tr>
{''.join(table_rows)}</table>
<h2>Per prompt</h2>
<p>Click a column to sort. Scores are means over seeds; "change" is round {rounds} minus round 0.</p>
{_prompt_table(rows, prompts, rounds, seeds, scorers)}
<h2>Images</h2>
<table class="grid"><tr><th>prompt</th>{head_cells}</tr>
{''.join(grid_rows)}</table>
<script>{SORT_SCRIPT}</script>
</body></html>
"""
    path = out_dir / REPORT_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
    return path


def _grid_row(rows: dict, index: int, seed_index: int, prompt: str, rounds: int, scorers: list[str], first) -> str:
    keys = [(index, seed_index, k) for k in range(rounds + 1)]
    best = None
    if first and all(key in rows and first in rows[key]["scores"] for key in keys):
        best = int(np.argmax([rows[key]["scores"][first] for key in keys]))  # the earliest of equal bests
    cells = []
    for k, key in enumerate(keys):
        row = rows.get(key)
        if row is None:
            cells.append('<td class="missing">not made</td>')
            continue
        scores = "<br>".join(f"{html.escape(name)} {row['scores'][name]:.4f}" for name in scorers if name in row["scores"])
        mark = '<div class="badge">best</div>' if k == best else ""
        cells.append(f'<td class="{"best" if k == best else "cell"}"><a href="{html.escape(row["image"])}">'
                     f'<img src="{html.escape(row["image"])}" alt="prompt {index} seed {seed_index} round {k}" '
                     f'loading="lazy"></a>{mark}<div class="scores">{scores}</div></td>')
    seed_label = f" <i>seed {rows[keys[0]]['seed']}</i>" if keys[0] in rows else ""
    return f"<tr><td class=\"prompt\"><b>{index}</b> {html.escape(prompt)}{seed_label}</td>{''.join(cells)}</tr>"


def _prompt_table(rows: dict, prompts: list[str], rounds: int, seeds: int, scorers: list[str]) -> str:
    """One row per prompt: per scorer the round-0 and last-round means over seeds and their change."""
    head = "".join(f"<th>{html.escape(name)} r0</th><th>{html.escape(name)} r{rounds}</th>"
                   f"<th>{html.escape(name)} change</th>" for name in scorers)
    body = []
    for index, prompt in enumerate(prompts):
        cells = []
        for name in scorers:
            values = [[rows[(index, j, r)]["scores"].get(name) if (index, j, r) in rows else None
                       for j in range(seeds)] for r in (0, rounds)]
            if any(value is None for per_round in values for value in per_round):
                cells.append('<td data-value="">-</td>' * 3)
                continue
            base, last = float(np.mean(values[0])), float(np.mean(values[1]))
            cells.append("".join(f'<td data-value="{value!r}">{value:.4f}</td>' for value in (base, last, last - base)))
        body.append(f'<tr><td data-value="{index}">{index}</td><td class="text">{html.escape(prompt)}</td>{"".join(cells)}</tr>')
    return (f'<table class="prompts sortable"><thead><tr><th>#</th><th>prompt</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _nice_ticks(low: float, high: float, count: int = PLOT_TICKS) -> list[float]:
    """About `count` round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    span = high - low
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _plot(title: str, y_label: str, rounds: int, points: list[tuple[int, float, list | None]],
          low: float, high: float, y_format, reference: float | None = None, ticks: list[float] | None = None) -> str:
    """An inline SVG: one y scale [low, high] with labelled ticks (`ticks`, default: round values over the
    scale), x = round, points with error bars."""
    left, right, top, bottom = (PLOT_MARGIN[side] for side in ("left", "right", "top", "bottom"))
    inner_width, inner_height = PLOT_WIDTH - left - right, PLOT_HEIGHT - top - bottom
    span_x = max(rounds, 1)

    def x_of(k: float) -> float:
        return left + inner_width * k / span_x

    def y_of(value: float) -> float:
        return top + inner_height * (1 - (value - low) / (high - low))

    parts = [f'<text x="{PLOT_WIDTH / 2}" y="18" font-size="13" text-anchor="middle">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{top + inner_height}" x2="{left + inner_width}" y2="{top + inner_height}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + inner_height}" stroke="#888"/>']
    for tick in ticks or _nice_ticks(low, high):
        if low - 1e-12 <= tick <= high + 1e-12:
            y = y_of(tick)
            parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + inner_width}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                         f'<text class="y-tick" x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                         f'{y_format(tick)}</text>')
    for k in range(rounds + 1):
        parts.append(f'<text class="x-tick" x="{x_of(k):.1f}" y="{top + inner_height + 14}" font-size="10" '
                     f'text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{left + inner_width / 2}" y="{PLOT_HEIGHT - 8}" font-size="11" text-anchor="middle">round</text>'
                 f'<text x="14" y="{top + inner_height / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + inner_height / 2})">{html.escape(y_label)}</text>')
    if reference is not None:
        parts.append(f'<line x1="{left}" y1="{y_of(reference):.1f}" x2="{left + inner_width}" y2="{y_of(reference):.1f}" '
                     'stroke="#999" stroke-dasharray="4 3"/>')
    if len(points) > 1:
        line = " ".join(f"{x_of(k):.1f},{y_of(v):.1f}" for k, v, _ in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f6feb" stroke-width="2"/>')
    for k, value, interval in points:
        if interval:
            parts.append(f'<line class="interval" x1="{x_of(k):.1f}" y1="{y_of(interval[0]):.1f}" x2="{x_of(k):.1f}" '
                         f'y2="{y_of(interval[1]):.1f}" stroke="#1f6feb" stroke-width="1.5"/>')
        parts.append(f'<circle cx="{x_of(k):.1f}" cy="{y_of(value):.1f}" r="4" fill="#1f6feb"><title>round {k}: '
                     f'{y_format(value)}</title></circle>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" role="img" '
            f'aria-label="{html.escape(title)}">{"".join(parts)}</svg>')


def _mean_plot(name: str, entry: dict) -> str:
    """Mean score per round on one scale covering every round's mean and interval."""
    means = entry["mean"]
    differences = entry.get("mean_difference_ci95", [None] * len(means))
    if means[0] is None:
        return ""
    points = [(k, value, [means[0] + differences[k][0], means[0] + differences[k][1]] if differences[k] else None)
              for k, value in enumerate(means) if value is not None]
    values = [v for _, v, _ in points] + [bound for _, _, interval in points if interval for bound in interval]
    low, high = min(values), max(values)
    pad = (high - low) * 0.1 or max(abs(high) * 0.01, 1e-6)
    ticks = _nice_ticks(low - pad, high + pad)
    decimals = max(0, -math.floor(math.log10(max(ticks[1] - ticks[0], 1e-12))))
    return _plot(f"mean {name}", name, len(means) - 1, points, ticks[0], ticks[-1],
                 lambda value: f"{value:.{decimals}f}", ticks=ticks)  # the scale's own ticks, not recomputed


def _win_rate_plot(name: str, entry: dict) -> str:
    """Win rate over round 0 per round k >= 1 on the fixed scale 0..1, with its interval."""
    points = [(k, rate, entry["ci95"][k]) for k, rate in enumerate(entry["win_rate"]) if rate is not None]
    if not points:
        return ""
    return _plot(f"{name}: win rate over round 0", "win rate", len(entry["win_rate"]) - 1, points, 0.0, 1.0,
                 lambda value: f"{100 * value:.0f}%", reference=0.5)


# ------------------------------------------------------------------------------------------- compare


# Settings two compared runs must share for their images to pair up (same prompts and seeds); others differ
# on purpose (that is the comparison) and are listed.
COMPARE_MUST_MATCH = ("seed", "seeds")


@dataclass
class Comparison:
    rows: list[dict]  # per scorer and round: n, means, win rate of A over B with interval, difference with interval
    differing_settings: list[str]  # "key: A vs B" of the settings that differ (what is being compared)
    warnings: list[str]  # unpaired prompts, mismatched seeds let through with allow_mismatch


def compare_runs(dir_a: Path, dir_b: Path, allow_mismatch: bool = False,
                 interval: str = DEFAULT_INTERVAL_METHOD) -> Comparison:
    """Run A against run B on the (prompt, seed) samples both hold: per scorer and round the means, the win
    rate of A over B (a prompt's seeds averaged) with its interval, and the mean difference A - B with a
    paired bootstrap interval. Runs made with another --seed/--seeds, or scored by another VQAScore judge,
    are refused (with `allow_mismatch`: a warning); unpaired prompts are named in a warning."""
    settings_a, settings_b = _run_settings(dir_a), _run_settings(dir_b)
    problems = [f"{key}: {settings_a.get(key)!r} in A, {settings_b.get(key)!r} in B" for key in COMPARE_MUST_MATCH
                if settings_a.get(key) != settings_b.get(key)]
    details_a, details_b = settings_a.get("scorer_details") or {}, settings_b.get("scorer_details") or {}
    problems += [f"scorer {name}: {details_a[name]} in A, {details_b[name]} in B" for name in details_a
                 if name in details_b and details_a[name] != details_b[name]]
    warnings = []
    if problems:
        message = "the runs were not made with the same seeds or scorers (" + "; ".join(problems) + ")"
        if not allow_mismatch:
            raise InvalidInputError(f"{message}: their images do not pair up. Rerun one of them with the other's "
                                    "settings, or pass --allow-mismatch to compare anyway")
        warnings.append(message)
    ignored = {"prompts", "prompt_count", "limit", "rounds", "scorers", "scorer_details", *COMPARE_MUST_MATCH}
    differing = [f"{key}: {settings_a.get(key)!r} vs {settings_b.get(key)!r}" for key in sorted(set(settings_a) | set(settings_b))
                 if key not in ignored and settings_a.get(key) != settings_b.get(key)]

    a, b = _samples_by_prompt(dir_a), _samples_by_prompt(dir_b)
    shared = sorted(set(a) & set(b))
    if not shared:
        prompts_a, prompts_b = {p for p, _ in a}, {p for p, _ in b}
        why = "the same prompts with other seeds" if prompts_a & prompts_b else "no prompt"
        raise InvalidInputError(f"{dir_a} and {dir_b} share {why}: nothing to compare")
    unpaired = len({p for p, _ in a} ^ {p for p, _ in b})
    if unpaired or len(shared) < max(len(a), len(b)):
        warnings.append(f"only {len(shared)} (prompt, seed) samples are in both runs ({len(a)} in A, {len(b)} in B, "
                        f"{unpaired} prompts in one run only): the numbers cover the shared ones")
    rounds = sorted({k for key in shared for k in a[key]} & {k for key in shared for k in b[key]})
    scorers = sorted({s for key in shared for r in a[key].values() for s in r}
                     & {s for key in shared for r in b[key].values() for s in r})
    table = []
    for scorer in scorers:
        for k in rounds:
            by_prompt: dict[str, list[tuple[float, float]]] = {}
            for key in shared:
                if scorer in a[key].get(k, {}) and scorer in b[key].get(k, {}):
                    by_prompt.setdefault(key[0], []).append((a[key][k][scorer], b[key][k][scorer]))
            if not by_prompt:
                continue
            outcomes = np.array([win_outcomes(np.array([[x for x, _ in pairs]]), np.array([[y for _, y in pairs]]))[0]
                                 for pairs in by_prompt.values()])  # (P,): seeds averaged per prompt
            differences = np.array([np.mean([x - y for x, y in pairs]) for pairs in by_prompt.values()])  # (P,)
            values = np.array([pair for pairs in by_prompt.values() for pair in pairs], dtype=np.float64)  # (N, 2)
            table.append({"scorer": scorer, "round": k, "n": len(by_prompt), "samples": len(values),
                          "mean_a": float(values[:, 0].mean()), "mean_b": float(values[:, 1].mean()),
                          "win_rate_a": float(outcomes.mean()), "win_rate_ci95": win_rate_interval(outcomes, interval),
                          "mean_difference": float(differences.mean()),
                          "mean_difference_ci95": bootstrap_interval(differences)})
    return Comparison(table, differing, warnings)


def _run_settings(out_dir: Path) -> dict:
    if not (out_dir / RESULTS_FILE).is_file():
        raise InvalidInputError(f"{out_dir} holds no {RESULTS_FILE}: pass a folder written by evaluate")
    try:
        return json.loads((out_dir / RUN_FILE).read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise InvalidInputError(f"{out_dir / RUN_FILE} is missing or damaged ({error}): pass a folder written by "
                                "evaluate") from error


def _samples_by_prompt(out_dir: Path) -> dict[tuple[str, int], dict[int, dict]]:
    """Scores by (prompt text, seed) and round; a repeated prompt counts at its first index only."""
    table: dict[tuple[str, int], dict[int, dict]] = {}
    first_index: dict[str, int] = {}
    for (index, _, round_index), row in sorted(read_results(out_dir).items()):
        if first_index.setdefault(row["prompt"], index) == index:
            table.setdefault((row["prompt"], row["seed"]), {})[round_index] = row["scores"]
    return table
