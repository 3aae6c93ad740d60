"""The paper's human A/B study over an `evaluate` folder: a blind pairwise page, votes in SQLite, the summary.

    python -m img_core study runs/sdxl [--round K] [--host 127.0.0.1] [--port 7861]   # serve the page
    python -m img_core study-summary runs/sdxl [--csv FILE]                             # the two rules

The IMG paper (user study): 33 raters compared image pairs blind; every pair was judged by 3 raters and only
pairs on which all 3 agreed were counted (about 70 % preferred IMG). Here a *pair* is round 0 and round K
(default: the last round) of the same prompt and seed in an evaluate folder. Each rater sees every pair at
most once, the refined image on the left or the right as a hash of (rater, pair) decides (random across
raters, stable for one rater across reloads), with the prompt and no scores, round numbers or file names.
Pairs with the fewest votes are offered first, so that pairs reach 3 raters before any gets a 4th.

Votes live in DIR/study.sqlite3 (WAL journal, synchronous=FULL, one transaction per vote: a killed server
loses no vote it acknowledged): rater id, pair, choice (left/right/tie), the side the refined image was on,
time. One vote per rater and pair; a re-vote replaces the earlier one.

The JSON API is what the page itself uses, so scripts can run a study too:
    GET  /api/next?rater=ID    -> {"pair", "prompt", "left", "right", "voted", "total"} ("pair": null when done)
    POST /api/vote             <- {"rater", "pair", "choice": "left"|"right"|"tie"}  -> {"voted", "total"}
    GET  /image?rater=ID&pair=P&side=left|right -> the PNG shown on that side for that rater

`study-summary`: on the pairs judged by at least 3 raters (their first 3 votes by time), the paper's rule
(only unanimous pairs count: the share where all 3 preferred the refined image, a unanimous tie counting
one half) and the plain majority rule (refined votes > base votes is a win, equal a half), each with a
Wilson 95 % interval (img_core.evaluation.statistics); a CSV with one line per pair.

The server is the standard library's ThreadingHTTPServer (no web framework; img_core never imports gradio),
bound to 127.0.0.1 unless --host says otherwise. Bad requests get one JSON error line and change nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from img_core.errors import InvalidInputError
from img_core.evaluation.evaluate import RUN_FILE, read_results, write_json_atomically
from img_core.evaluation.statistics import wilson_interval

logger = logging.getLogger(__name__)

VOTES_FILE = "study.sqlite3"
SUMMARY_FILE = "study_summary.json"
PAIRS_CSV = "study_pairs.csv"
CHOICES = ("left", "right", "tie")
RATERS_PER_PAIR = 3  # the paper's protocol: each pair judged by 3 raters
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7861
RATER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_BODY_BYTES = 4096


@dataclass(frozen=True)
class StudyPair:
    pair: str  # "{prompt:05d}-s{seed index}-r{round}"
    prompt_index: int
    seed_index: int
    round: int
    prompt: str
    base_image: Path  # round 0
    refined_image: Path  # round `round`


def study_pairs(eval_dir: Path, round_index: int | None = None) -> list[StudyPair]:
    """Round 0 vs round `round_index` (default: the folder's last round) of every prompt and seed that has both."""
    eval_dir = Path(eval_dir)
    if not (eval_dir / RUN_FILE).is_file():
        raise InvalidInputError(f"{eval_dir} holds no {RUN_FILE}: pass a folder written by `evaluate`")
    rows = read_results(eval_dir)
    last = max((key[2] for key in rows), default=0)
    round_index = last if round_index is None else round_index
    if round_index < 1 or round_index > last:
        raise InvalidInputError(f"--round must be between 1 and {last} (the rounds this folder holds), got {round_index}")
    pairs = []
    for (prompt_index, seed_index, current), row in sorted(rows.items()):
        if current == round_index and (prompt_index, seed_index, 0) in rows:
            pairs.append(StudyPair(f"{prompt_index:05d}-s{seed_index}-r{round_index}", prompt_index, seed_index,
                                   round_index, row["prompt"], eval_dir / rows[(prompt_index, seed_index, 0)]["image"],
                                   eval_dir / row["image"]))
    if not pairs:
        raise InvalidInputError(f"{eval_dir} has no prompt with both round 0 and round {round_index}: nothing to compare")
    return pairs


def refined_side(rater: str, pair: str) -> str:
    """Which side the refined image is on for this rater: a hash, so random across raters and stable for one."""
    return "left" if hashlib.sha256(f"{rater}|{pair}".encode()).digest()[0] % 2 == 0 else "right"


def check_rater(rater: object) -> str:
    if not isinstance(rater, str) or not RATER_ID.match(rater):
        raise InvalidInputError("rater id must be 1-64 letters, digits, '-' or '_'")
    return rater


# ------------------------------------------------------------------------------------------------ votes


class VotesDB:
    """The votes of one study (SQLite, WAL); one connection per call, so any thread may use it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS votes (rater TEXT NOT NULL, pair TEXT NOT NULL, "
                "choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')), "
                "refined_side TEXT NOT NULL CHECK (refined_side IN ('left', 'right')), time REAL NOT NULL, "
                "PRIMARY KEY (rater, pair))"
            )

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30)
        connection.execute("PRAGMA synchronous=FULL")  # a vote acknowledged is on disk
        return connection

    def vote(self, rater: str, pair: str, choice: str, side_of_refined: str, at: float | None = None) -> None:
        """Record (or replace) one rater's vote on one pair, committed before returning."""
        if choice not in CHOICES:
            raise InvalidInputError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        connection = self._connect()
        try:
            with connection:  # one transaction, committed on leaving
                connection.execute(
                    "INSERT INTO votes (rater, pair, choice, refined_side, time) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (rater, pair) DO UPDATE SET choice = excluded.choice, "
                    "refined_side = excluded.refined_side, time = excluded.time",
                    (check_rater(rater), pair, choice, side_of_refined, time.time() if at is None else at),
                )
        finally:
            connection.close()

    def votes(self) -> list[dict]:
        connection = self._connect()
        try:
            cursor = connection.execute("SELECT rater, pair, choice, refined_side, time FROM votes ORDER BY time, rater")
            return [dict(zip(("rater", "pair", "choice", "refined_side", "time"), row)) for row in cursor]
        finally:
            connection.close()

    def counts(self) -> dict[str, int]:
        connection = self._connect()
        try:
            return dict(connection.execute("SELECT pair, COUNT(*) FROM votes GROUP BY pair"))
        finally:
            connection.close()

    def voted_by(self, rater: str) -> set[str]:
        connection = self._connect()
        try:
            return {row[0] for row in connection.execute("SELECT pair FROM votes WHERE rater = ?", (rater,))}
        finally:
            connection.close()


def preference(vote: dict) -> str:
    """"refined", "base" or "tie": what a left/right vote says once the sides are known."""
    if vote["choice"] == "tie":
        return "tie"
    return "refined" if vote["choice"] == vote["refined_side"] else "base"


# ---------------------------------------------------------------------------------------------- summary


def summarize_votes(pairs: list[StudyPair], votes: list[dict], raters_per_pair: int = RATERS_PER_PAIR) -> dict:
    """The paper's unanimous rule and the majority rule on pairs with >= `raters_per_pair` votes (their
    first `raters_per_pair` by time), with Wilson intervals; and one line per pair for the CSV."""
    by_pair: dict[str, list[dict]] = {}
    for vote in sorted(votes, key=lambda v: (v["time"], v["rater"])):
        by_pair.setdefault(vote["pair"], []).append(vote)
    lines = []
    unanimous_outcomes, majority_outcomes = [], []
    for pair in pairs:
        judged = [preference(vote) for vote in by_pair.get(pair.pair, [])]
        counted = judged[:raters_per_pair]
        unanimous = majority = ""
        if len(counted) == raters_per_pair:
            if len(set(counted)) == 1:
                unanimous = counted[0]
                unanimous_outcomes.append({"refined": 1.0, "tie": 0.5, "base": 0.0}[unanimous])
            refined, base = counted.count("refined"), counted.count("base")
            majority = "refined" if refined > base else "base" if base > refined else "tie"
            majority_outcomes.append({"refined": 1.0, "tie": 0.5, "base": 0.0}[majority])
        lines.append({"pair": pair.pair, "prompt_index": pair.prompt_index, "seed_index": pair.seed_index,
                      "round": pair.round, "prompt": pair.prompt, "votes": len(judged),
                      "refined": judged.count("refined"), "base": judged.count("base"), "tie": judged.count("tie"),
                      "unanimous": unanimous, "majority": majority})

    def rule(outcomes: list[float]) -> dict:
        if not outcomes:
            return {"pairs": 0, "refined_win_rate": None, "ci95": None}
        wins = sum(outcomes)
        return {"pairs": len(outcomes), "refined_win_rate": wins / len(outcomes),
                "ci95": wilson_interval(wins, len(outcomes))}

    judged_pairs = sum(1 for line in lines if line["votes"] >= raters_per_pair)
    return {"pairs": len(pairs), "pairs_judged": judged_pairs, "raters_per_pair": raters_per_pair,
            "raters": len({vote["rater"] for vote in votes}), "votes": len(votes),
            "unanimous": rule(unanimous_outcomes), "majority": rule(majority_outcomes), "per_pair": lines}


def write_study_summary(eval_dir: Path, csv_path: Path | None = None, round_index: int | None = None) -> dict:
    """study_summary.json and the per-pair CSV of an evaluate folder's study; returns the summary."""
    eval_dir = Path(eval_dir)
    if not (eval_dir / VOTES_FILE).is_file():
        raise InvalidInputError(f"{eval_dir} has no votes yet: run `python -m img_core study {eval_dir}` first")
    pairs = study_pairs(eval_dir, round_index)
    summary = summarize_votes(pairs, VotesDB(eval_dir / VOTES_FILE).votes())
    csv_path = Path(csv_path) if csv_path else eval_dir / PAIRS_CSV
    temporary = csv_path.with_name(f".{csv_path.name}.tmp")
    with temporary.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(summary["per_pair"][0]))
        writer.writeheader()
        writer.writerows(summary["per_pair"])
    temporary.replace(csv_path)
    write_json_atomically(eval_dir / SUMMARY_FILE, {key: value for key, value in summary.items() if key != "per_pair"})
    return summary


# ----------------------------------------------------------------------------------------------- server


class Study:
    """The pairs of one folder and its votes: what the HTTP handler serves."""

    def __init__(self, eval_dir: Path, round_index: int | None = None):
        self.pairs = study_pairs(eval_dir, round_index)
        self.by_id = {pair.pair: pair for pair in self.pairs}
        self.votes = VotesDB(Path(eval_dir) / VOTES_FILE)
        self._lock = threading.Lock()  # next-pair choice and vote together: raters spread over pairs

    def next_pair(self, rater: str) -> dict:
        rater = check_rater(rater)
        with self._lock:
            done = self.votes.voted_by(rater)
            counts = self.votes.counts()
        open_pairs = [pair for pair in self.pairs if pair.pair not in done]
        voted = len(self.pairs) - len(open_pairs)
        if not open_pairs:
            return {"pair": None, "voted": voted, "total": len(self.pairs)}
        # fewest votes first (pairs reach 3 raters before any gets a 4th), then an order of the rater's own
        chosen = min(open_pairs, key=lambda pair: (min(counts.get(pair.pair, 0), RATERS_PER_PAIR),
                                                   hashlib.sha256(f"{rater}|{pair.pair}|order".encode()).digest()))
        query = f"rater={rater}&pair={chosen.pair}"
        return {"pair": chosen.pair, "prompt": chosen.prompt, "left": f"/image?{query}&side=left",
                "right": f"/image?{query}&side=right", "voted": voted, "total": len(self.pairs)}

    def vote(self, rater: object, pair: object, choice: object) -> dict:
        rater = check_rater(rater)
        if pair not in self.by_id:
            raise InvalidInputError("unknown pair: ask /api/next for one")
        if choice not in CHOICES:
            raise InvalidInputError(f"choice must be one of {', '.join(CHOICES)}")
        with self._lock:
            self.votes.vote(rater, pair, choice, refined_side(rater, pair))
            voted = len(self.votes.voted_by(rater))
        return {"voted": voted, "total": len(self.pairs)}

    def image(self, rater: str, pair: str, side: str) -> Path:
        rater = check_rater(rater)
        if pair not in self.by_id or side not in ("left", "right"):
            raise InvalidInputError("unknown pair or side")
        chosen = self.by_id[pair]
        return chosen.refined_image if side == refined_side(rater, pair) else chosen.base_image


def make_handler(study: Study) -> type[BaseHTTPRequestHandler]:
    class StudyHandler(BaseHTTPRequestHandler):
        server_version = "IMGStudy"
        study_pairs = study.pairs

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            logger.debug("study: " + format, *args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, data: dict, status: int = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(data).encode("utf-8"), "application/json")

        def _error(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
            self._json({"error": message}, status)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            try:
                if url.path == "/":
                    self._send(HTTPStatus.OK, STUDY_PAGE.encode("utf-8"), "text/html; charset=utf-8")
                elif url.path == "/api/next":
                    self._json(study.next_pair(query.get("rater")))
                elif url.path == "/image":
                    path = study.image(query.get("rater"), query.get("pair"), query.get("side"))
                    self._send(HTTPStatus.OK, path.read_bytes(), "image/png")
                else:
                    self._error("not found", HTTPStatus.NOT_FOUND)
            except InvalidInputError as error:
                self._error(str(error))
            except OSError:
                self._error("that image cannot be read on the server", HTTPStatus.INTERNAL_SERVER_ERROR)

        def do_POST(self) -> None:  # noqa: N802
            if urlparse(self.path).path != "/api/vote":
                self._error("not found", HTTPStatus.NOT_FOUND)
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY_BYTES:
                    raise InvalidInputError("a vote is a small JSON object")
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise InvalidInputError("a vote is a JSON object")
                self._json(study.vote(body.get("rater"), body.get("pair"), body.get("choice")))
            except (InvalidInputError, ValueError) as error:
                self._error(str(error) if isinstance(error, InvalidInputError) else "the body is not valid JSON")
            except sqlite3.Error:
                logger.exception("study: a vote could not be stored")
                self._error("the vote could not be stored; try again", HTTPStatus.SERVICE_UNAVAILABLE)

    return StudyHandler


def make_server(eval_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                round_index: int | None = None) -> ThreadingHTTPServer:
    """The study's HTTP server (not started: call `serve_forever`). Port 0 picks a free port."""
    handler = make_handler(Study(eval_dir, round_index))
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        raise InvalidInputError(f"cannot listen on {host}:{port} ({error.strerror or error}): pass another --port "
                                "(0 picks a free one) or --host") from error
    server.daemon_threads = True
    return server


STUDY_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Which image matches the prompt better?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
#prompt { font-size: 20px; margin: 12px 0 18px; min-height: 2em; }
.images { display: flex; gap: 24px; justify-content: center; }
.images figure { margin: 0; text-align: center; }
.images img { width: min(480px, 44vw); height: min(480px, 44vw); object-fit: contain; background: #f4f4f4;
              border: 1px solid #ddd; }
.buttons { display: flex; gap: 16px; justify-content: center; margin: 18px 0; }
button { font-size: 16px; padding: 10px 22px; cursor: pointer; }
#status, #error { text-align: center; color: #555; }
#error { color: #b42318; }
</style></head><body>
<h1>Which image matches the prompt better?</h1>
<p>Look at both images and choose the one that shows the prompt better, or "about the same".
Keys: 1 = left, 2 = same, 3 = right.</p>
<div id="prompt"></div>
<div class="images"><figure><img id="left" alt="left image"><figcaption>left</figcaption></figure>
<figure><img id="right" alt="right image"><figcaption>right</figcaption></figure></div>
<div class="buttons"><button id="vote-left" data-choice="left" disabled>Left is better</button>
<button id="vote-tie" data-choice="tie" disabled>About the same</button>
<button id="vote-right" data-choice="right" disabled>Right is better</button></div>
<p id="status"></p><p id="error"></p>
<script>
const params = new URLSearchParams(location.search);
let rater = params.get('rater') || localStorage.getItem('img-study-rater');
if (!rater) { rater = 'r' + Math.random().toString(36).slice(2, 12); }
localStorage.setItem('img-study-rater', rater);
let current = null, busy = false;
const buttons = Array.from(document.querySelectorAll('button[data-choice]'));
function show(message) { document.getElementById('error').textContent = message || ''; }
async function next() {
  const response = await fetch('/api/next?rater=' + encodeURIComponent(rater));
  const data = await response.json();
  if (!response.ok) { show(data.error); return; }
  document.getElementById('status').textContent = `${data.voted} of ${data.total} done`;
  current = data.pair;
  document.body.dataset.pair = current || '';
  if (!current) {
    document.getElementById('prompt').textContent = 'All pairs done. Thank you!';
    document.querySelector('.images').style.display = 'none';
    buttons.forEach(b => b.disabled = true);
    return;
  }
  document.getElementById('prompt').textContent = data.prompt;
  document.getElementById('left').src = data.left;
  document.getElementById('right').src = data.right;
  buttons.forEach(b => b.disabled = false);
}
async function vote(choice) {
  if (!current || busy) return;
  busy = true; buttons.forEach(b => b.disabled = true);
  try {
    const response = await fetch('/api/vote', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                               body: JSON.stringify({rater, pair: current, choice})});
    const data = await response.json();
    if (!response.ok) { show(data.error); buttons.forEach(b => b.disabled = false); return; }
    show('');
    await next();
  } catch (error) { show('The vote did not reach the server; try again.'); buttons.forEach(b => b.disabled = false); }
  finally { busy = false; }
}
buttons.forEach(b => b.addEventListener('click', () => vote(b.dataset.choice)));
document.addEventListener('keydown', e => { const c = {'1': 'left', '2': 'tie', '3': 'right'}[e.key]; if (c) vote(c); });
next();
</script></body></html>
"""
