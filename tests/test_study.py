"""The human A/B study (img_core.evaluation.study): the votes database, the paper's unanimous rule and the
majority rule, the JSON API over a real HTTP server, three raters in Chromium, and a server killed mid-vote."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from img_core.errors import InvalidInputError

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
BASE_COLOUR, REFINED_COLOUR = (200, 30, 30), (30, 160, 60)


def make_eval_folder(out: Path, prompts: int = 4) -> Path:
    """An evaluate folder's files (run.json, results.jsonl, images/): round 0 red, round 1 green."""
    from img_core.evaluation.evaluate import (
        RUN_FORMAT,
        image_name,
        write_json_atomically,
        write_results,
    )

    (out / "images").mkdir(parents=True)
    write_json_atomically(out / "run.json", {"format": RUN_FORMAT, "settings": {"rounds": 1}})
    rows = {}
    for index in range(prompts):
        for round_index, colour in ((0, BASE_COLOUR), (1, REFINED_COLOUR)):
            name = image_name(index, round_index)
            Image.new("RGB", (64, 64), colour).save(out / name)
            rows[(index, 0, round_index)] = {"prompt_index": index, "seed_index": 0, "prompt": f"prompt number {index}",
                                             "seed": index, "round": round_index, "image": name, "scores": {}}
    write_results(out / "results.jsonl", rows)
    return out


def choice_for(rater: str, pair: str, wanted: str) -> str:
    """The left/right/tie click that says `wanted` ("refined", "base" or "tie") for this rater's sides."""
    from img_core.evaluation.study import refined_side

    if wanted == "tie":
        return "tie"
    side = refined_side(rater, pair)
    return side if wanted == "refined" else ("left" if side == "right" else "right")


# pair -> what raters r1, r2, r3 prefer: unanimous refined, unanimous base, 2 of 3 refined, a tie and 2 refined
PLAN = {"00000-s0-r1": ("refined", "refined", "refined"), "00001-s0-r1": ("base", "base", "base"),
        "00002-s0-r1": ("refined", "base", "refined"), "00003-s0-r1": ("tie", "refined", "refined")}
RATERS = ("r1", "r2", "r3")
UNANIMOUS_WIN_RATE = 1 / 2  # pairs 0 and 1 are unanimous: one for the refined image
MAJORITY_WIN_RATE = 3 / 4  # pairs 0, 2 and 3 have a refined majority


def test_votes_are_one_per_rater_and_pair_and_a_revote_replaces(tmp_path):
    import sqlite3

    from img_core.evaluation.study import VotesDB

    votes = VotesDB(tmp_path / "study.sqlite3")
    votes.vote("alice", "p1", "left", "left", at=1.0)
    votes.vote("bob", "p1", "tie", "right", at=2.0)
    votes.vote("alice", "p1", "right", "left", at=3.0)  # alice changes her mind
    assert [(v["rater"], v["choice"], v["time"]) for v in votes.votes()] == [("bob", "tie", 2.0), ("alice", "right", 3.0)]
    assert votes.counts() == {"p1": 2} and votes.voted_by("alice") == {"p1"}
    with pytest.raises(InvalidInputError, match="choice must be one of left, right, tie"):
        votes.vote("alice", "p2", "both", "left")
    with pytest.raises(InvalidInputError, match="rater id"):
        votes.vote("alice smith", "p2", "left", "left")
    assert votes.counts() == {"p1": 2}  # refused votes change nothing
    with sqlite3.connect(tmp_path / "study.sqlite3") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_papers_unanimous_rule_and_the_majority_rule(tmp_path):
    from img_core.evaluation.study import (
        VotesDB,
        refined_side,
        study_pairs,
        summarize_votes,
        write_study_summary,
    )

    folder = make_eval_folder(tmp_path / "run")
    votes = VotesDB(folder / "study.sqlite3")
    for step, (pair, wanted) in enumerate(PLAN.items()):
        for rater, preference in zip(RATERS, wanted):
            votes.vote(rater, pair, choice_for(rater, pair, preference), refined_side(rater, pair),
                       at=10.0 * step + RATERS.index(rater))
    votes.vote("late", "00001-s0-r1", "tie", "left", at=100.0)  # a 4th vote: only the first 3 count
    summary = summarize_votes(study_pairs(folder), votes.votes())
    assert summary["pairs"] == summary["pairs_judged"] == 4 and summary["raters"] == 4
    assert summary["unanimous"]["pairs"] == 2 and summary["unanimous"]["refined_win_rate"] == UNANIMOUS_WIN_RATE
    assert summary["majority"]["pairs"] == 4 and summary["majority"]["refined_win_rate"] == MAJORITY_WIN_RATE
    low, high = summary["unanimous"]["ci95"]
    assert low < UNANIMOUS_WIN_RATE < high and high - low > 0.5  # 2 pairs: a wide interval
    written = write_study_summary(folder)
    lines = (folder / "study_pairs.csv").read_text().splitlines()
    assert lines[0].startswith("pair,prompt_index,seed_index,round,prompt,votes,refined,base,tie,unanimous,majority")
    assert lines[2].endswith(",4,0,3,1,base,base") and len(lines) == 5  # pair 1: 4 votes, the first 3 unanimous
    assert json.loads((folder / "study_summary.json").read_text())["unanimous"] == written["unanimous"]


def test_fewer_than_three_raters_count_for_neither_rule(tmp_path):
    from img_core.evaluation.study import study_pairs, summarize_votes

    folder = make_eval_folder(tmp_path / "run", prompts=1)
    votes = [{"rater": r, "pair": "00000-s0-r1", "choice": "left", "refined_side": "left", "time": t}
             for t, r in enumerate(("a", "b"))]
    summary = summarize_votes(study_pairs(folder), votes)
    assert summary["pairs_judged"] == 0 and summary["unanimous"] == {"pairs": 0, "refined_win_rate": None, "ci95": None}
    with pytest.raises(InvalidInputError, match="--round must be between 1 and 1"):
        study_pairs(folder, 2)


def request(url: str, body: dict | bytes | None = None) -> tuple[int, dict | bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
            payload = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        payload, status = error.read(), error.code
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


@pytest.fixture
def served_study(tmp_path):
    from img_core.evaluation.study import make_server

    folder = make_eval_folder(tmp_path / "run")
    server = make_server(folder, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_json_api_is_blind_and_refuses_bad_requests_without_server_paths(served_study):
    from img_core.evaluation.study import refined_side

    folder, url = served_study
    status, first = request(f"{url}/api/next?rater=alice")
    assert status == 200 and first["total"] == 4 and first["voted"] == 0 and first["prompt"].startswith("prompt number")
    assert "png" not in json.dumps(first) and "r0" not in first["left"]  # no file names or rounds in the page
    status, left = request(url + first["left"])
    with Image.open(__import__("io").BytesIO(left)) as image:
        shown = image.getpixel((1, 1))
    assert shown == (REFINED_COLOUR if refined_side("alice", first["pair"]) == "left" else BASE_COLOUR)
    sides = {refined_side(rater, first["pair"]) for rater in ("alice", "bob", "carol", "dave", "erin", "frank")}
    assert sides == {"left", "right"}  # randomised across raters
    for body, message in (({"rater": "alice", "pair": first["pair"], "choice": "up"}, "choice must be one of"),
                          ({"rater": "a b", "pair": first["pair"], "choice": "left"}, "rater id"),
                          ({"rater": "alice", "pair": "../../etc/passwd", "choice": "left"}, "unknown pair"),
                          (b"{not json", "not valid JSON")):
        status, answer = request(f"{url}/api/vote", body)
        assert status == 400 and message in answer["error"] and str(folder) not in answer["error"]
    status, answer = request(f"{url}/api/vote", {"rater": "alice", "pair": first["pair"], "choice": "tie"})
    assert status == 200 and answer == {"voted": 1, "total": 4}
    status, second = request(f"{url}/api/next?rater=alice")
    assert second["pair"] != first["pair"] and second["voted"] == 1
    status, answer = request(f"{url}/image?rater=alice&pair={first['pair']}&side=middle")
    assert status == 400 and "unknown pair or side" in answer["error"]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: install the Debian package `chromium`")
def test_three_raters_vote_on_every_pair_in_chromium(served_study):
    pytest.importorskip("playwright", reason="the browser test needs the playwright package (requirements-dev.txt)")
    from playwright.sync_api import expect, sync_playwright

    from img_core.evaluation.study import write_study_summary

    folder, url = served_study
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for number, rater in enumerate(RATERS):
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"{url}/?rater={rater}")
            for _ in PLAN:
                expect(page.locator("#vote-left")).to_be_enabled()
                pair = page.evaluate("document.body.dataset.pair")
                page.wait_for_function("['left', 'right'].every(id => document.getElementById(id).naturalWidth > 0)")
                if rater == "r1" and pair == "00000-s0-r1":
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "study_page.png"))
                before = page.locator("#status").inner_text()
                page.click(f"#vote-{choice_for(rater, pair, PLAN[pair][number])}")
                expect(page.locator("#status")).not_to_have_text(before)
            expect(page.locator("#prompt")).to_have_text("All pairs done. Thank you!")
            assert page.locator("#status").inner_text() == "4 of 4 done"
            page.close()
        browser.close()
    summary = write_study_summary(folder)
    assert summary["votes"] == 12 and summary["pairs_judged"] == 4
    assert summary["unanimous"]["refined_win_rate"] == UNANIMOUS_WIN_RATE
    assert summary["majority"]["refined_win_rate"] == MAJORITY_WIN_RATE


@pytest.mark.slow
def test_votes_survive_a_server_killed_mid_vote(tmp_path):
    from img_core.evaluation.study import VotesDB

    folder = make_eval_folder(tmp_path / "run", prompts=30)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "img_core", "study", str(folder), "--port", "0"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        url = line.split("http://", 1)[1].split("/", 1)[0]
        acknowledged: list[tuple[str, str]] = []
        stop = threading.Event()

        def vote_as(rater: str) -> None:
            while not stop.is_set():
                try:
                    status, pair = request(f"http://{url}/api/next?rater={rater}")
                    if not pair.get("pair"):
                        return
                    status, _ = request(f"http://{url}/api/vote", {"rater": rater, "pair": pair["pair"], "choice": "left"})
                except OSError:
                    return  # the server is gone
                if status == 200:
                    acknowledged.append((rater, pair["pair"]))

        voters = [threading.Thread(target=vote_as, args=(f"rater{i}",)) for i in range(4)]
        for voter in voters:
            voter.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # mid-vote: the voters are still sending
        server.wait(timeout=30)
        stop.set()
        for voter in voters:
            voter.join(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert len(acknowledged) >= 20
    stored = {(vote["rater"], vote["pair"]) for vote in VotesDB(folder / "study.sqlite3").votes()}
    assert set(acknowledged) <= stored  # every vote the server acknowledged is on disk


def test_a_busy_port_is_one_clear_error(served_study):
    from img_core.evaluation.study import make_server

    folder, url = served_study
    with pytest.raises(InvalidInputError, match="cannot listen on 127.0.0.1:.*pass another --port"):
        make_server(folder, port=int(url.rsplit(":", 1)[1]))
