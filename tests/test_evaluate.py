"""`evaluate` on tiny-sdxl with our prompt file (6 prompts, 2 rounds, 2 steps): the files, numbers that
match results.jsonl, determinism, resuming without regenerating, refusing other settings; prompt sets;
`evaluate-compare`."""

import hashlib
import json

import numpy as np
import pytest

from img_core.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = 6
ROUNDS = 2
SCORERS = ["hpsv2", "clipscore", "vqascore", "vqascore:self"]


def evaluate_args(out, *extra):
    from img_core.evaluation.prompt_sets import COMPOSITIONAL_PROMPTS

    return ["--preset", "tiny-sdxl", "--prompts", str(COMPOSITIONAL_PROMPTS), "--limit", str(PROMPTS), "--rounds",
            str(ROUNDS), "--steps", "2", "--scorers", ",".join(SCORERS), "--out", str(out), "--quiet", *extra]


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def counted_rounds(monkeypatch):
    """Counts real generate/refine calls (the real methods run) and remembers the session that made them."""
    from img_core.session import IMGSession

    calls = {"generate": 0, "refine": 0, "sessions": []}
    for name in ("generate", "refine"):
        original = getattr(IMGSession, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            calls["sessions"].append(self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(IMGSession, name, counting)
    return calls


@pytest.fixture(scope="module")
def first_run(tiny_root, tmp_path_factory):
    from img_core.cli.evaluate import build_parser
    from img_core.evaluation.evaluate import run_evaluation

    out = tmp_path_factory.mktemp("evaluate") / "run"
    result = run_evaluation(build_parser().parse_args(evaluate_args(out)))
    return out, result


def test_evaluate_writes_images_results_summary_and_report(first_run):
    out, result = first_run
    assert result.generated == PROMPTS * (ROUNDS + 1)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{i:05d}_r{r}.png" for i in range(PROMPTS) for r in range(ROUNDS + 1)
    )
    rows = read_rows(out)
    assert len(rows) == PROMPTS * (ROUNDS + 1)
    for row in rows:
        assert set(row) == {"prompt_index", "seed_index", "prompt", "seed", "round", "image", "scores"}
        assert row["seed_index"] == 0
        assert row["seed"] == row["prompt_index"]  # --seed 0: prompt i uses seed i
        assert row["image"] == f"images/{row['prompt_index']:05d}_r{row['round']}.png"
        assert set(row["scores"]) == set(SCORERS)
    html = (out / "report.html").read_text()
    assert html.count("<img ") == PROMPTS * (ROUNDS + 1) and html.count("<svg") == 2 * len(SCORERS)
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from outside


def test_summary_numbers_equal_what_results_jsonl_gives(first_run):
    from img_core.evaluation.statistics import wilson_interval

    out, _ = first_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == PROMPTS and summary["rounds"] == ROUNDS
    assert summary["settings"]["preset"] == "tiny-sdxl" and summary["settings"]["seed"] == 0
    rows = read_rows(out)
    for name in SCORERS:
        scores = np.zeros((PROMPTS, ROUNDS + 1))
        for row in rows:
            scores[row["prompt_index"], row["round"]] = row["scores"][name]
        entry = summary["scorers"][name]
        assert entry["mean"] == pytest.approx(scores.mean(axis=0).tolist(), abs=1e-12)
        assert entry["win_rate"][0] is None and entry["ci95"][0] is None
        for k in range(1, ROUNDS + 1):
            wins = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores[:, k], scores[:, 0]))
            assert entry["win_rate"][k] == pytest.approx(wins / PROMPTS)
            assert entry["ci95"][k] == pytest.approx(wilson_interval(wins, PROMPTS), abs=1e-12)
            assert entry["mean_difference"][k] == pytest.approx(float(np.mean(scores[:, k] - scores[:, 0])), abs=1e-9)
            low, high = entry["mean_difference_ci95"][k]
            assert low <= entry["mean_difference"][k] <= high
    # the judges are named; the guidance MLLM judging itself is flagged in the summary and the report
    assert summary["judges"] == {"vqascore": {"judge": "tiny-qwen", "self_judged": False},
                                 "vqascore:self": {"judge": "tiny-llava", "self_judged": True}}
    assert summary["self_judged"] is True
    report = (out / "report.html").read_text()
    assert "vqascore:self is judged by tiny-llava: <b>self-judged</b>" in report
    assert "vqascore is judged by tiny-qwen, not the guidance MLLM" in report
    # our prompt file's first 6 prompts are all "color binding": that category's numbers are the whole run's
    assert list(summary["categories"]) == ["color binding"]
    for name in SCORERS:
        by_category = summary["categories"]["color binding"][name]
        assert by_category["mean"] == summary["scorers"][name]["mean"]
        assert by_category["win_rate"] == summary["scorers"][name]["win_rate"]
        assert by_category["ci95"] == summary["scorers"][name]["ci95"]  # categories get intervals too


def test_rerun_generates_nothing_and_other_settings_are_refused(first_run, counted_rounds, capsys):
    from img_core.cli.evaluate import main
    from img_core.cli.main import main as cli_main

    out, _ = first_run
    before = (out / "results.jsonl").read_text()
    assert main(evaluate_args(out)) == 0
    assert counted_rounds["generate"] == counted_rounds["refine"] == 0
    assert (out / "results.jsonl").read_text() == before
    assert cli_main(["evaluate", *evaluate_args(out, "--seed", "1")]) == 2  # one line on stderr, exit 2
    assert "other settings (seed: 0 there, 1 now)" in capsys.readouterr().err
    with pytest.raises(InvalidInputError, match="guidance_mode"):
        main(evaluate_args(out, "--guidance-mode", "dialogue"))
    assert (out / "results.jsonl").read_text() == before


def test_same_seed_gives_identical_scores_and_compare_reads_both(first_run, tmp_path, counted_rounds, capsys):
    from img_core.cli.evaluate import compare_main, main
    from img_core.evaluation.evaluate import compare_runs

    out, _ = first_run
    second = tmp_path / "second"
    assert main(evaluate_args(second, "--limit", "2", "--rounds", "1")) == 0  # a prefix of the first run
    assert counted_rounds["generate"] == 2 and counted_rounds["refine"] == 2
    session = counted_rounds["sessions"][0]
    assert session.backend is None and session.aligner is None  # freed before the CLIP scorers loaded
    first = {(r["prompt_index"], r["round"]): r["scores"] for r in read_rows(out)}
    for row in read_rows(second):
        assert row["scores"] == first[(row["prompt_index"], row["round"])]  # bit-identical

    comparison = compare_runs(out, second)
    table = comparison.rows
    assert {(row["scorer"], row["round"], row["n"]) for row in table} == {(s, k, 2) for s in SCORERS for k in (0, 1)}
    assert all(row["win_rate_a"] == 0.5 and row["mean_a"] == row["mean_b"] for row in table)  # all ties
    assert all(row["mean_difference_ci95"] == [0.0, 0.0] for row in table)
    assert all(row["win_rate_ci95"][1] - row["win_rate_ci95"][0] > 0.5 for row in table)  # 2 prompts: wide
    assert any("only 2 (prompt, seed) samples" in warning for warning in comparison.warnings)
    assert compare_main([str(out), str(second)]) == 0
    assert "hpsv2" in capsys.readouterr().out


def test_interrupted_run_resumes_with_only_the_missing_image(first_run, tmp_path, counted_rounds):
    import shutil

    from img_core.cli.evaluate import main

    out = tmp_path / "copy"
    shutil.copytree(first_run[0], out)
    (out / "images" / "00005_r2.png").unlink()  # the last image was never written ...
    with (out / "results.jsonl").open("a") as file:
        file.write('{"prompt_index": 5, "pro')  # ... and the run died mid-line
    assert main(evaluate_args(out)) == 0
    assert counted_rounds["generate"] == 0 and counted_rounds["refine"] == 1
    rows = read_rows(out)
    assert len(rows) == PROMPTS * (ROUNDS + 1)
    original = {(r["prompt_index"], r["round"]): r["scores"] for r in read_rows(first_run[0])}
    for row in rows:  # the same image again: the same scores (scored in a batch of one: float noise only)
        expected = original[(row["prompt_index"], row["round"])]
        assert row["scores"] == {name: pytest.approx(value, rel=1e-5, abs=1e-6) for name, value in expected.items()}


def test_arguments_are_checked_before_anything_loads(tmp_path, counted_rounds):
    from img_core.cli.evaluate import main

    with pytest.raises(InvalidInputError, match="unknown scorer"):
        main(evaluate_args(tmp_path / "a", "--scorers", "hps"))
    with pytest.raises(InvalidInputError, match="--rounds"):
        main(evaluate_args(tmp_path / "b", "--rounds", "0"))
    with pytest.raises(InvalidInputError, match="dialogue mode"):
        main(evaluate_args(tmp_path / "c", "--no-critique", "--guidance-mode", "dialogue"))
    with pytest.raises(InvalidInputError, match="ip scale"):  # ranges come from img_core.settings, as for refine
        main(evaluate_args(tmp_path / "c", "--ip-scale", "5"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not empty"):
        main(evaluate_args(tmp_path / "d"))
    assert counted_rounds["generate"] == counted_rounds["refine"] == 0


def test_win_rate_ties_and_bootstrap_are_fixed():
    from img_core.evaluation.evaluate import summarize, win_rate
    from img_core.evaluation.statistics import bootstrap_interval, wilson_interval

    assert win_rate(np.array([2.0, 1.0, 3.0, 1.0]), np.array([1.0, 1.0, 3.0, 2.0])) == pytest.approx((1 + 0.5 + 0.5) / 4)
    outcomes = np.array([1.0, 0.0, 0.5, 1.0, 1.0])
    assert bootstrap_interval(outcomes) == bootstrap_interval(outcomes)  # fixed seed
    assert bootstrap_interval(np.ones(7)) == [1.0, 1.0]
    rows = {(i, 0, r): {"prompt": "p", "scores": {"s": float(i + r)}} for i in range(3) for r in range(2)}
    del rows[(2, 0, 1)]["scores"]["s"]  # an unscored image: prompt 2 is left out of the numbers
    summary = summarize(rows, 3, 1, ["s"], {}, categories=["a", "b", "a"])
    assert summary["scorers"]["s"]["n_prompts"] == 2
    assert summary["scorers"]["s"]["mean"] == [0.5, 1.5] and summary["scorers"]["s"]["win_rate"] == [None, 1.0]
    category_a = summary["categories"]["a"]["s"]
    assert category_a["n_prompts"] == 1 and category_a["mean"] == [0.0, 1.0] and category_a["win_rate"] == [None, 1.0]
    assert category_a["ci95"] == [None, wilson_interval(1, 1)] and category_a["mean_difference"] == [None, 1.0]
    assert summary["categories"]["b"]["s"]["mean"] == [1.0, 2.0]


def test_several_seeds_per_prompt_keep_the_prompt_as_the_unit():
    from img_core.evaluation.evaluate import summarize
    from img_core.evaluation.statistics import wilson_interval

    # prompt 0: round 1 wins on both seeds; prompt 1: wins on one seed of two; prompt 2: loses on both
    base = {(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 1.0, (2, 0): 1.0, (2, 1): 1.0}
    refined = {(0, 0): 2.0, (0, 1): 3.0, (1, 0): 2.0, (1, 1): 0.0, (2, 0): 0.0, (2, 1): 0.5}
    rows = {}
    for (i, j), value in base.items():
        rows[(i, j, 0)] = {"scores": {"s": value}}
        rows[(i, j, 1)] = {"scores": {"s": refined[(i, j)]}}
    entry = summarize(rows, 3, 1, ["s"], {}, seeds=2)["scorers"]["s"]
    assert entry["n_prompts"] == 3  # prompts, not images
    assert entry["win_rate"][1] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert entry["ci95"][1] == pytest.approx(wilson_interval(1.5, 3))
    per_prompt_differences = [(1.0 + 2.0) / 2, (1.0 - 1.0) / 2, (-1.0 - 0.5) / 2]
    assert entry["mean_difference"][1] == pytest.approx(np.mean(per_prompt_differences))


def test_prompt_sets_read_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from img_core.evaluation.prompt_sets import (
        COMPOSITIONAL_PROMPTS,
        PromptSetError,
        load_prompt_set,
    )

    ours = load_prompt_set(COMPOSITIONAL_PROMPTS)
    assert len(ours.prompts) == len(set(ours.prompts)) == 120
    assert {c: ours.categories.count(c) for c in set(ours.categories)} == {
        "color binding": 20, "shape and texture binding": 20, "counting": 20, "spatial relations": 20,
        "non-spatial relations and actions": 20, "complex multi-object scenes": 20}

    (tmp_path / "a.txt").write_text("# a comment\n\nfirst prompt\n# category: x\n second  prompt \n")
    assert load_prompt_set(tmp_path / "a.txt").prompts == ["first prompt", "second prompt"]
    assert load_prompt_set(tmp_path / "a.txt").categories == [None, "x"]
    (tmp_path / "b.json").write_text(json.dumps(["one", "two"]))
    assert load_prompt_set(tmp_path / "b.json").prompts == ["one", "two"]
    (tmp_path / "c.csv").write_text('prompt,id\n"a, b",1\nc,2\n')
    assert load_prompt_set(tmp_path / "c.csv").prompts == ["a, b", "c"]
    (tmp_path / "d.tsv").write_text("Prompt\tCategory\nx y\tz\n")
    assert load_prompt_set(tmp_path / "d.tsv", column="Prompt").prompts == ["x y"]
    pq.write_table(pa.table({"caption": ["p1", "p2", "p3"]}), tmp_path / "e.parquet")
    assert load_prompt_set(tmp_path / "e.parquet", column="caption").prompts == ["p1", "p2", "p3"]
    assert load_prompt_set(tmp_path / "b.json").sha256 != load_prompt_set(tmp_path / "e.parquet", column="caption").sha256

    assert load_prompt_set(tmp_path / "e.parquet").prompts == ["p1", "p2", "p3"]  # `caption` found by itself
    with pytest.raises(PromptSetError, match="no column 'text'"):
        load_prompt_set(tmp_path / "e.parquet", column="text")
    assert load_prompt_set(tmp_path / "d.tsv", column="Prompt").categories == ["z"]
    (tmp_path / "f.json").write_text(json.dumps(["ok", ""]))
    with pytest.raises(PromptSetError, match="prompt 1 is not a non-empty string"):
        load_prompt_set(tmp_path / "f.json")
    with pytest.raises(PromptSetError, match="no file or folder here"):
        load_prompt_set(tmp_path / "missing.txt")
    with pytest.raises(PromptSetError, match="hub dataset 'nobody/no-such-prompts'.*could not be read"):
        load_prompt_set("nobody/no-such-prompts", column="caption")  # HF_HUB_OFFLINE=1
    # the Pick-a-Pic recipe reads the captions-only dataset (150 kB), never the 204 GB one with images
    with pytest.raises(PromptSetError, match="'yuvalkirstain/pickapic_v1_no_images' \\(split 'test_unique'\\)"):
        load_prompt_set("pickapic-test")


def test_geneval_drawbench_and_hpd_folders_are_read_with_categories(tmp_path):
    from img_core.evaluation.prompt_sets import PromptSetError, load_prompt_set

    geneval = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
               {"tag": "two_object", "include": [], "prompt": "a photo of a cat and a dog"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in geneval))
    read = load_prompt_set(tmp_path / "evaluation_metadata.jsonl")
    assert read.prompts == ["a photo of a bench", "a photo of a cat and a dog"]
    assert read.categories == ["single_object", "two_object"]
    (tmp_path / "drawbench.csv").write_text('Prompts,Category\n"A red colored car.",Colors\nA tiger.,Rare Words\n')
    drawbench = load_prompt_set(tmp_path / "drawbench.csv")
    assert drawbench.prompts == ["A red colored car.", "A tiger."] and drawbench.categories == ["Colors", "Rare Words"]
    benchmark = tmp_path / "benchmark"
    benchmark.mkdir()
    for style, count in (("anime", 3), ("concept-art", 3), ("drawbench", 1), ("paintings", 3), ("photo", 3)):
        (benchmark / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(count)]))
    hpd = load_prompt_set(benchmark)
    assert len(hpd.prompts) == 13 and hpd.prompts[:4] == ["anime 0", "anime 1", "anime 2", "concept-art 0"]
    assert hpd.categories.count("drawbench") == 1 and hpd.categories[-1] == "photo"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptSetError, match="line 2 is not valid JSON"):
        load_prompt_set(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptSetError, match="no .json prompt lists"):
        load_prompt_set(tmp_path / "empty")


def test_offline_release_questions_record_the_source_actually_used_with_two_seeds(tiny_root, tmp_path, monkeypatch):
    from img_core import questions
    from img_core.cli.evaluate import main
    from img_core.paths import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # nothing cached ...
    cache_path = questions.release_questions_cache_path()
    # ... and this process already failed to fetch the release's file: offline, without touching the network
    monkeypatch.setattr(questions, "_failed_fetches", {(questions.RELEASE_QUESTIONS_URL, str(cache_path))})
    out = tmp_path / "run"
    args = ["--limit", "1", "--rounds", "1", "--seeds", "2", "--scorers", "clipscore", "--questions", "release"]
    assert main([*evaluate_args(out)[:4], *args, "--steps", "2", "--out", str(out), "--quiet"]) == 0
    rows = read_rows(out)  # one prompt, two seeds, rounds 0 and 1
    assert [(r["seed_index"], r["seed"], r["round"], r["image"]) for r in rows] == [
        (0, 0, 0, "images/00000_r0.png"), (0, 0, 1, "images/00000_r1.png"),
        (1, 1_000_000, 0, "images/00000_s1_r0.png"), (1, 1_000_000, 1, "images/00000_s1_r1.png")]
    settings = json.loads((out / "run.json").read_text())["settings"]
    ours = questions.ours_question_source()
    assert settings["questions"] == "release" and settings["questions_used"] == "ours"
    assert settings["questions_sha256"] == hashlib.sha256(json.dumps(list(ours.templates)).encode()).hexdigest()
    assert "'release'" in settings["questions_fallback"] and "'ours' was used" in settings["questions_fallback"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["questions_used"] == "ours" and summary["seeds"] == 2
    assert summary["n_prompts"] == summary["scorers"]["clipscore"]["n_prompts"] == 1  # the prompt is the unit
    scores = {(r["seed_index"], r["round"]): r["scores"]["clipscore"] for r in rows}
    wins = [1.0 if scores[(j, 1)] > scores[(j, 0)] else 0.5 if scores[(j, 1)] == scores[(j, 0)] else 0.0 for j in (0, 1)]
    assert summary["scorers"]["clipscore"]["win_rate"][1] == pytest.approx(sum(wins) / 2)
    assert "ours" in (out / "report.html").read_text()

    # the same folder with our questions asked for directly: the images would be the same, but the record
    # would mix two requests; a resume with other questions is refused, naming the setting
    with pytest.raises(InvalidInputError, match="questions: 'release' there, 'ours' now"):
        main([*evaluate_args(out)[:4], *args[:-1], "ours", "--steps", "2", "--out", str(out), "--quiet"])


def test_compare_refuses_runs_with_other_seeds_and_reports_intervals(tmp_path):
    from img_core.cli.evaluate import compare_main
    from img_core.evaluation.evaluate import (
        RUN_FORMAT,
        compare_runs,
        write_json_atomically,
        write_results,
    )

    def folder(name: str, seed: int, shift: float, mode: str) -> object:
        out = tmp_path / name
        (out / "images").mkdir(parents=True)
        rows = {}
        for index in range(5):
            for round_index in (0, 1):
                image = f"images/{index:05d}_r{round_index}.png"
                (out / image).write_bytes(b"png")
                rows[(index, 0, round_index)] = {"prompt_index": index, "seed_index": 0, "prompt": f"p{index}",
                                                 "seed": seed + index, "round": round_index, "image": image,
                                                 "scores": {"s": index + round_index * shift}}
        write_results(out / "results.jsonl", rows)
        write_json_atomically(out / "run.json", {"format": RUN_FORMAT, "settings": {
            "seed": seed, "seeds": 1, "guidance_mode": mode}})
        return out

    a, b, other_seed = folder("a", 0, 1.0, "dialogue"), folder("b", 0, 0.5, "question"), folder("c", 100, 0.5, "question")
    comparison = compare_runs(a, b)
    round_one = next(row for row in comparison.rows if row["round"] == 1)
    assert round_one["n"] == 5 and round_one["win_rate_a"] == 1.0 and round_one["mean_difference"] == 0.5
    assert round_one["mean_difference_ci95"] == [0.5, 0.5]
    low, high = round_one["win_rate_ci95"]
    assert high == 1.0 and high - low >= 0.2  # Wilson: 5 of 5 is not certainty
    assert comparison.differing_settings == ["guidance_mode: 'dialogue' vs 'question'"]
    with pytest.raises(InvalidInputError, match="seed: 0 in A, 100 in B"):
        compare_runs(a, other_seed)
    with pytest.raises(InvalidInputError, match="the same prompts with other seeds"):
        compare_runs(a, other_seed, allow_mismatch=True)  # nothing pairs up: still nothing to compare
    assert compare_main([str(a), str(b), "--interval", "clopper-pearson"]) == 0


def test_a_failing_evaluate_leaves_no_empty_out_folder(tmp_path, tiny_root):
    """The folder is made before the models load; real weights are missing offline, so the run fails
    after making it - and the empty folders it made go again."""
    from img_core.cli.evaluate import main
    from img_core.errors import IMGError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "new" / "run"
    with pytest.raises(IMGError):
        main(["--preset", "sdxl", "--prompts", str(prompts), "--out", str(out), "--scorers", "clipscore", "--quiet"])
    assert not (tmp_path / "new").exists()
