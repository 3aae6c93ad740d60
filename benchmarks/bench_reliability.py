"""Reliability figures: what happens to damaged or hostile inputs.

    python benchmarks/bench_reliability.py                       # every section (CPU, about a minute + ~10 for app)
    python benchmarks/bench_reliability.py --sections images     # one or more sections by name

Sections (one function each, returning table rows):
  checkpoints  training checkpoints with flipped bytes, truncated, empty, non-finite weights:
               detected? fell back to the newest good one? refused with a clear error when none is good?
  store        feature-store shards (flipped, truncated, empty, missing), manifests (shards null, a list,
               truncated JSON), a NaN sample and an all-NaN store: refused / skipped / stopped, and never
               a non-finite aligner saved
  images       header bombs (PNG, JPEG, GIF declaring huge canvases; ICO and ICNS holding a 13000x13000
               PNG, an ICO holding a 20000x20000 one, a GIF frame larger than its screen, APNG, animated
               WebP), folders, non-images: refused cleanly (InvalidInputError, no other exception, no PIL
               warning), time per refusal, and the peak RSS growth of a fresh process refusing each bomb
  app          `python app.py --preset tiny-sdxl` with its own TMPDIR: malformed API calls (seeds 1.5 /
               true / "x" / NaN / lists, non-text prompts, missing values, non-images, a bomb, server
               paths) tried / refused cleanly (a sentence, no traceback, no server path) / tracebacks /
               server deaths; RSS and files under TMPDIR per 100 of 500 /refine calls after a warm-up;
               everything removed after SIGTERM (CPU, ~10 minutes)
  doors        the app with a login: every bad API call on the queue route and on the REST route
               (/gradio_api/call/NAME): refused cleanly, the same sentence on both; ICO/ICNS/GIF-frame bombs
               sent to /critique (RSS before/after); 200 wrong logins in parallel: how many are answered before HTTP 429
  sessions     RSS per 100 API calls, each from a new session with its own seed, with idle sessions kept
               (--session-idle-seconds 1e9, as before) and freed (--session-idle-seconds 2)
  sigterm      SIGTERM while a page job runs (200 steps) and an API call waits: exit status, seconds to
               exit, what each client was told, files left

A row's `ok` says whether the outcome is the wanted one; the script exits 1 if any row is not ok. To add a
section, write `def bench_<name>(work: Path) -> list[Row]` and add it to SECTIONS.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from img_core.errors import CorruptFileError, InvalidInputError  # noqa: E402
from img_core.images import MAX_MEGAPIXELS, load_image  # noqa: E402
from img_core.integrity import write_checksum  # noqa: E402
from tests.hostile_images import (  # noqa: E402
    animated_webp,
    apng_bomb,
    gif_declaring,
    gif_with_frame,
    icns_holding,
    ico_holding,
    jpeg_declaring,
    png_bomb,
    tiled_tiff,
)
from trainer.store import shard_name, write_manifest, write_synthetic_store  # noqa: E402
from trainer.train import (  # noqa: E402
    TrainConfig,
    checkpoint_dirs,
    load_checkpoint,
    split_indices,
    train,
)

TINY_RUN = {"depth": 2, "heads": 2, "dim_head": 16, "lr": 3e-3, "batch_size": 8, "val_samples": 8,
            "val_every": 1000, "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 3, "max_steps": 6}
DAMAGES = ("flipped", "truncated", "empty")
BOMB_SIDE = 20_000  # the 20000x20000 PNG


@dataclass
class Row:
    section: str
    case: str
    expected: str
    observed: str
    ok: bool
    detail: str = ""


# ----------------------------------------------------------------------------------------- helpers


class WarningLog(logging.Handler):
    """Collects the warnings the trainer logs while a case runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "flipped":  # 4 KiB of inverted bytes in the middle
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :])
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        path.unlink()


def outcome_of(action) -> tuple[str, str]:
    """Run action(); return ("ok", result) or (error class name, message) for an exception."""
    try:
        return "ok", str(action())
    except Exception as error:  # noqa: BLE001 - the benchmark reports every kind of failure
        return type(error).__name__, str(error)


def short(text: str, length: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 3] + "..."


def poison_samples(store: Path, indices: list[int], value: float = float("nan")) -> None:
    """Write `value` into stored samples (bypassing write_shard, which refuses it) and re-describe the
    store, as a store damaged upstream of the checksums would be."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest = json.loads((store / "manifest.json").read_text())
    offset = 0
    for name, size in zip(manifest["shards"], manifest["shard_sizes"]):
        rows = [i - offset for i in indices if offset <= i < offset + size]
        if rows:
            with safe_open(str(store / name), framework="pt") as handle:
                tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
            tensors["image_l"][rows, 0, 0] = value
            save_file(tensors, str(store / name), metadata=metadata)
        offset += size
    write_manifest(store, manifest)


# ----------------------------------------------------------------------------------------- checkpoints


def bench_checkpoints(work: Path) -> list[Row]:
    store = work / "store"
    write_synthetic_store(store, 64, shard_size=32, seed=1)
    rows = []
    for kind in (*DAMAGES, "non-finite"):
        run = work / f"run-{kind}"
        train(TrainConfig(features=str(store), out=str(run), **TINY_RUN))  # checkpoints at steps 2, 4, 6
        newest = run / "checkpoints" / "step-00000006" / "checkpoint.pt"
        if kind == "non-finite":  # NaN weights with a matching checksum: only the finiteness check sees it
            state = torch.load(newest, weights_only=True)
            state["aligner"]["zero_linear.bias"][0] = float("nan")
            torch.save(state, newest)
            write_checksum(newest)
        else:
            damage(newest, kind)

        status, message = outcome_of(lambda: load_checkpoint(newest.parent))
        rows.append(Row("checkpoints", f"{kind}: load step 6", "refused", status,
                        status == CorruptFileError.__name__, message))
        log = WarningLog()
        logging.getLogger("trainer.train").addHandler(log)
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(run), resume="latest",
                                                               **TINY_RUN)))
        logging.getLogger("trainer.train").removeHandler(log)
        fell_back = any("falling back" in m for m in log.messages)
        redone = [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004", "step-00000006"]
        rows.append(Row("checkpoints", f"{kind}: --resume", "fell back to step 4 with a warning",
                        f"{'fell back' if fell_back else 'no warning'}, run {status}", fell_back and status == "ok"
                        and redone, next((m for m in log.messages if "falling back" in m), message)))

        for folder in checkpoint_dirs(run):
            damage(folder / "checkpoint.pt", kind if kind != "non-finite" else "flipped")
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(run), resume="latest",
                                                               **{**TINY_RUN, "max_steps": 8})))
        rows.append(Row("checkpoints", f"{kind}: all damaged, --resume", "refused", status,
                        status == CorruptFileError.__name__, message))
    return rows


# ----------------------------------------------------------------------------------------- store


def bench_store(work: Path) -> list[Row]:
    rows = []
    for kind in (*DAMAGES, "missing"):
        store = work / f"store-{kind}"
        write_synthetic_store(store, 64, shard_size=32, seed=2)
        damage(store / shard_name(1), kind)
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(work / f"run-{kind}"),
                                                               **TINY_RUN)))
        named = shard_name(1) in message
        rows.append(Row("store", f"shard {kind}: train", "refused naming the shard",
                        status, status in (CorruptFileError.__name__, "FileNotFoundError") and named, message))

    manifest_damages = {
        "shards: null": lambda m: json.dumps({**m, "shards": None}),
        "manifest is a list": lambda m: json.dumps([m]),
        "shard_sha256 is a list": lambda m: json.dumps({**m, "shard_sha256": list(m["shard_sha256"].values())}),
        "truncated JSON": lambda m: json.dumps(m)[:200],
    }
    for case, edit in manifest_damages.items():
        store = work / f"manifest-{len(rows)}"
        manifest = write_synthetic_store(store, 16, shard_size=8)
        (store / "manifest.json").write_text(edit(manifest))
        status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(store / "run"),
                                                               **TINY_RUN)))
        named = "manifest.json" in message
        rows.append(Row("store", f"manifest {case}: train", "refused naming file and field", status,
                        status == CorruptFileError.__name__ and named, message))

    store = work / "store-one-nan"
    write_synthetic_store(store, 64, shard_size=32, seed=3)
    poison_samples(store, [split_indices(64, TINY_RUN["val_samples"], 0)[0][0]])
    status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(work / "run-one-nan"),
                                                           **TINY_RUN)))
    records = [json.loads(line) for line in (work / "run-one-nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_nonfinite"] for r in records if "skipped_nonfinite" in r][-1]
    from img_core.aligner import ImplicitAligner

    finite = status == "ok" and all(torch.isfinite(v).all() for v in
                                     ImplicitAligner.from_pretrained(message).state_dict().values())
    rows.append(Row("store", "one NaN sample: train", "skipped, counted, finite aligner saved",
                    f"skipped {skipped}, final {'finite' if finite else 'NOT finite'}", skipped >= 1 and finite))

    store = work / "store-all-nan"
    write_synthetic_store(store, 32, shard_size=32, seed=4)
    poison_samples(store, list(range(32)))
    run = work / "run-all-nan"
    status, message = outcome_of(lambda: train(TrainConfig(features=str(store), out=str(run),
                                                           **{**TINY_RUN, "max_skipped_in_a_row": 4})))
    saved_nonfinite = [p.name for p in checkpoint_dirs(run)
                       if not all(torch.isfinite(v).all() for v in load_checkpoint(p)["aligner"].values())]
    rows.append(Row("store", "all samples NaN: train", "stopped with an error, nothing non-finite saved",
                    f"{status}, final/ {'exists' if (run / 'final').exists() else 'absent'}",
                    status == CorruptFileError.__name__ and not (run / "final").exists() and not saved_nonfinite,
                    message))
    return rows


# ----------------------------------------------------------------------------------------- images


def format_bombs() -> dict[str, bytes]:
    """The bombs of issue 19 (formats whose readers decoded, or raised PIL's own error)."""
    return {
        "ICO holding a 13000x13000 PNG": ico_holding(png_bomb(13_000, 13_000)),
        f"ICO holding a {BOMB_SIDE}x{BOMB_SIDE} PNG": ico_holding(png_bomb(BOMB_SIDE, BOMB_SIDE)),
        "ICNS holding a 13000x13000 PNG": icns_holding(png_bomb(13_000, 13_000)),
        f"GIF: 16x16 screen, {BOMB_SIDE}x{BOMB_SIDE} frame": gif_with_frame((16, 16), (BOMB_SIDE, BOMB_SIDE)),
        "GIF: 16x16 screen, 9000x9000 frame": gif_with_frame((16, 16), (9000, 9000)),
        "APNG 13000x13000": apng_bomb(13_000, 13_000),
        "animated WebP declaring 13000x13000": animated_webp(13_000, 13_000),
        "TIFF: a 64x64 image in one 16384x16384 tile": tiled_tiff(64, 16_384),
    }


RSS_PROBE = """
import sys, time
sys.path.insert(0, {repo!r})
from img_core.images import load_image
from img_core.errors import InvalidInputError

def peak_kb():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))

data = open({path!r}, "rb").read()
before = peak_kb()
start = time.perf_counter()
try:
    load_image(data)
    outcome = "decoded"
except InvalidInputError:
    outcome = "refused"
except Exception as error:
    outcome = type(error).__name__
seconds = time.perf_counter() - start
print(outcome, before, peak_kb(), seconds)
"""


def bench_images(work: Path) -> list[Row]:
    (work / "a folder.png").mkdir()
    (work / "notes.png").write_text("this is not an image")
    (work / "empty.png").write_bytes(b"")
    from PIL import Image

    noise = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noise, format="PNG")
    cases = {
        f"PNG {BOMB_SIDE}x{BOMB_SIDE} bomb": png_bomb(BOMB_SIDE, BOMB_SIDE),
        "PNG 13000x13000 bomb": png_bomb(13_000, 13_000),
        "PNG 8000x6000 (48 Mpx)": png_bomb(8000, 6000),
        "JPEG declaring 30000x30000": jpeg_declaring(30_000, 30_000),
        "GIF declaring 65535x65535": gif_declaring(65_535, 65_535),
        **format_bombs(),
        "folder": work / "a folder.png",
        "missing file": work / "missing.png",
        "text file named .png": work / "notes.png",
        "empty file": work / "empty.png",
        "random bytes": os.urandom(4096),
        "truncated PNG (half the file)": noise.getvalue()[: len(noise.getvalue()) // 2],
    }
    rows = []
    for case, source in cases.items():
        caught: list[str] = []
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            status, message = outcome_of(lambda: load_image(source))
            caught = [f"{w.category.__name__}" for w in raised]
        seconds = time.perf_counter() - start
        size = f"{len(source) / 1e3:.0f} KB, " if isinstance(source, bytes) else ""
        clean = status == InvalidInputError.__name__ and not caught
        rows.append(Row("images", case, "refused cleanly", f"{status}{' + ' + ','.join(caught) if caught else ''}",
                        clean, f"{size}{seconds * 1e3:.1f} ms: {message}"))

    fresh = {f"PNG {BOMB_SIDE}x{BOMB_SIDE} bomb": cases[f"PNG {BOMB_SIDE}x{BOMB_SIDE} bomb"], **format_bombs()}
    for index, (case, data) in enumerate(fresh.items()):
        bomb_path = work / f"bomb-{index}"
        bomb_path.write_bytes(data)
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE.format(repo=str(REPO), path=str(bomb_path))],
                               capture_output=True, text=True, timeout=120)
        outcome, before_kb, after_kb, seconds = probe.stdout.split()
        growth_mb = (int(after_kb) - int(before_kb)) / 1024
        rows.append(Row("images", f"{case}, fresh process", "refused, < 10 MB peak RSS growth", outcome,
                        outcome == "refused" and growth_mb < 10,
                        f"{float(seconds) * 1e3:.1f} ms, peak RSS {int(before_kb) / 1024:.0f} -> "
                        f"{int(after_kb) / 1024:.0f} MB (+{growth_mb:.1f} MB); cap {MAX_MEGAPIXELS:g} Mpx"))
    return rows


# ----------------------------------------------------------------------------------------- app


APP_START_TIMEOUT_S = 180
APP_WARMUP_CALLS = 20
APP_REFINE_CALLS = 500
APP_SEEDS = 7  # the calls cycle through these seeds: 7 distinct outputs, each cached by Gradio once
APP_PROMPT = "A green banana and a brown horse."


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppProcess:
    """`python app.py --preset tiny-sdxl` on a free local port, with its own TMPDIR (so every file it or
    Gradio writes lands in one folder this benchmark can count) and its log in a file."""

    def __init__(self, work: Path, *flags: str, env: dict[str, str] | None = None):
        self.tmp = work / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "app.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, TMPDIR=str(self.tmp), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        env.pop("GRADIO_TEMP_DIR", None)
        command = [sys.executable, str(REPO / "app.py"), "--preset", "tiny-sdxl", "--device", "cpu",
                   "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_until_up()

    def wait_until_up(self) -> None:
        import urllib.request

        deadline = time.monotonic() + APP_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {APP_START_TIMEOUT_S} s")
            time.sleep(0.25)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def files(self) -> list[Path]:
        """Every file under the app's TMPDIR (its own folder, Gradio's cache, uploads, exports)."""
        return [p for p in self.tmp.rglob("*") if p.is_file() or p.is_symlink()]

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, as a service manager stops it; the exit status."""
        self.process.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def queue_call(url: str, data, fn_index: int | None = None, api_name: str | None = None,
               session_hash: str = "bench", opener=None) -> tuple[bool, object]:
    """One event through Gradio's queue over plain HTTP (as any script can, without gradio_client):
    (success, output data) or (False, the error message the client is shown). `opener`: a urllib opener
    holding a login cookie."""
    import urllib.request

    urllib_open = (opener or urllib.request.build_opener()).open
    if fn_index is None:
        config = json.loads(urllib_open(url + "config", timeout=10).read())
        fn_index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name)
    body = {"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None, "trigger_id": None}
    request = urllib.request.Request(url + "gradio_api/queue/join", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        urllib_open(request, timeout=30).read()
    except urllib.error.HTTPError as error:
        return False, f"HTTP {error.code}: {error.read().decode(errors='replace')}"
    with urllib_open(f"{url}gradio_api/queue/data?session_hash={session_hash}", timeout=120) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                output = message.get("output") or {}
                if message.get("success"):
                    return True, output.get("data")
                return False, output.get("error")
    return False, "stream ended without a result"


def clean_refusal(message: object, app: AppProcess) -> tuple[bool, str]:
    """Whether an error message is a clean refusal: a sentence (not a bare 'Error' / None), no traceback,
    no server path."""
    text = str(message)
    if text.strip() in ("", "None", "Error", "null"):
        return False, f"bare {text!r}"
    if "Traceback" in text:
        return False, "traceback"
    if str(app.tmp) in text or str(REPO) in text or "/tmp/" in text:
        return False, "server path"
    return True, ""


def bad_app_inputs(work: Path) -> list[tuple[str, str, object]]:
    """(case, endpoint, arguments): malformed API calls a client can send."""
    good, not_image, bomb = work / "good.png", work / "notes.png", work / "bomb.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 160, 40)).save(good)
    not_image.write_text("this is text, not a picture")
    bomb.write_bytes(png_bomb(BOMB_SIDE, BOMB_SIDE))
    return [
        ("seed 1.5", "/generate", [APP_PROMPT, 1.5]),
        ("seed True", "/generate", [APP_PROMPT, True]),
        ("seed 'x'", "/generate", [APP_PROMPT, "x"]),
        ("seed NaN", "/generate", [APP_PROMPT, float("nan")]),
        ("seed [1]", "/generate", [APP_PROMPT, [1]]),
        ("seed -1", "/generate", [APP_PROMPT, -1]),
        ("seed 2**32", "/generate", [APP_PROMPT, 2**32]),
        ("seed None", "/generate", [APP_PROMPT, None]),
        ("prompt 123", "/generate", [123, 0]),
        ("prompt ['a']", "/generate", [["a"], 0]),
        ("prompt None", "/generate", [None, 0]),
        ("prompt ''", "/generate", ["", 0]),
        ("no arguments", "/generate", []),
        ("one argument", "/generate", [APP_PROMPT]),
        ("data not a list", "/generate", "x"),
        ("critique: no image", "/critique", [None, APP_PROMPT]),
        ("critique: text file", "/critique", [not_image, APP_PROMPT]),
        ("critique: PNG bomb", "/critique", [bomb, APP_PROMPT]),
        ("critique: prompt 5", "/critique", [good, 5]),
        ("critique: no arguments", "/critique", []),
        ("critique: a server path as text", "/critique", ["/etc/hostname", APP_PROMPT]),
        ("critique: a file record outside the upload cache", "/critique",
         [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, APP_PROMPT]),
        ("refine: seed 1.5", "/refine", [good, APP_PROMPT, "", 1.5]),
        ("refine: seed 'x'", "/refine", [good, APP_PROMPT, "", "x"]),
        ("refine: critique 5", "/refine", [good, APP_PROMPT, 5, 0]),
        ("refine: text file", "/refine", [not_image, APP_PROMPT, "", 0]),
        ("refine: missing seed", "/refine", [good, APP_PROMPT, ""]),
    ]


def bench_app(work: Path) -> list[Row]:
    """The app under hostile API calls and 500 /refine calls: clean refusals, RSS and file growth."""
    from gradio_client import Client, handle_file

    app = AppProcess(work / "app")
    client = Client(app.url, verbose=False)
    rows = []
    try:
        tried = refused = tracebacks = 0
        unclean = []
        for case, endpoint, arguments in bad_app_inputs(work):
            if isinstance(arguments, list):
                arguments = [handle_file(str(a)) if isinstance(a, Path) else a for a in arguments]
                if any(isinstance(a, dict) for a in arguments):  # files: upload through the client
                    try:
                        client.predict(*arguments, api_name=endpoint)
                        ok, message = True, "accepted"
                    except Exception as error:  # noqa: BLE001 - every failure is an outcome
                        ok, message = False, str(error)
                else:
                    ok, message = queue_call(app.url, arguments, api_name=endpoint.lstrip("/"))
            else:
                ok, message = queue_call(app.url, arguments, api_name=endpoint.lstrip("/"))
            tried += 1
            clean, why = clean_refusal(message, app) if not ok else (False, "accepted")
            refused += clean
            tracebacks += "Traceback" in str(message)
            if not clean:
                unclean.append(f"{case}: {why or short(str(message), 60)}")
                print(f"[app] not refused cleanly: {case}: {short(str(message), 300)}", file=sys.stderr)
            if not app.alive:
                break
        log_tracebacks = app.log_path.read_text().count("Traceback")
        rows.append(Row("app", f"{tried} bad API calls", "all refused with a message", f"{refused} refused cleanly",
                        refused == tried, "; ".join(unclean) or "every message a sentence, no path"))
        rows.append(Row("app", "tracebacks", "none to clients", f"{tracebacks} to clients, {log_tracebacks} in the "
                        "server log", tracebacks == 0))
        rows.append(Row("app", "server deaths", "0", str(int(not app.alive)), app.alive))

        image = work / "good.png"
        for call in range(APP_WARMUP_CALLS):  # the same seeds as below: their outputs are cached once
            client.predict(handle_file(str(image)), APP_PROMPT, "", call % APP_SEEDS, api_name="/refine")
        files_before, rss = len(app.files()), [app.rss_mb()]
        start = time.perf_counter()
        for call in range(1, APP_REFINE_CALLS + 1):
            client.predict(handle_file(str(image)), APP_PROMPT, "", call % APP_SEEDS, api_name="/refine")
            if call % 100 == 0:
                rss.append(app.rss_mb())
        seconds = time.perf_counter() - start
        files_after = len(app.files())
        slope = (rss[-1] - rss[0]) / (APP_REFINE_CALLS / 100)
        rows.append(Row("app", f"{APP_REFINE_CALLS} /refine calls after {APP_WARMUP_CALLS} warm-up", "RSS grows < 20 MB",
                        f"+{rss[-1] - rss[0]:.1f} MB ({slope:+.2f} MB/100 calls)", rss[-1] - rss[0] < 20,
                        f"RSS per 100 calls: {' '.join(f'{r:.0f}' for r in rss)} MB; {seconds / APP_REFINE_CALLS * 1e3:.0f} "
                        "ms/call"))
        rows.append(Row("app", f"{APP_REFINE_CALLS} /refine calls: files", "no growth",
                        f"{files_after - files_before:+d} files ({(files_after - files_before) / (APP_REFINE_CALLS / 100):+.1f}"
                        "/100 calls)", files_after <= files_before, f"{files_before} -> {files_after} files under TMPDIR"))
    finally:
        status = app.stop()
    left = app.files()
    rows.append(Row("app", "SIGTERM", "clean exit, nothing left in TMPDIR", f"exit {status}, {len(left)} files left",
                    status == 0 and not left, ", ".join(str(p.relative_to(app.tmp)) for p in left[:3])))
    return rows


def rest_call(url: str, data, api_name: str, opener) -> tuple[bool, object]:
    """One event over Gradio's REST route: POST /gradio_api/call/NAME, then read its event stream."""
    import urllib.request

    request = urllib.request.Request(url + f"gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        event_id = json.loads(opener.open(request, timeout=30).read())["event_id"]
    except urllib.error.HTTPError as error:
        return False, f"HTTP {error.code}: {error.read().decode(errors='replace')}"
    event = None
    with opener.open(url + f"gradio_api/call/{api_name}/{event_id}", timeout=120) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line[5:])
                if event == "complete":
                    return True, payload
                return False, payload.get("error") if isinstance(payload, dict) else payload
    return False, "stream ended without a result"


def upload(url: str, path: Path, opener) -> dict:
    """`path` uploaded as a browser does (POST /gradio_api/upload): the file record to send."""
    import urllib.request

    boundary = "bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    server_path = json.loads(opener.open(request, timeout=30).read())[0]
    return {"path": server_path, "meta": {"_type": "gradio.FileData"}}


def login(url: str, user: str, password: str, opener=None) -> int:
    import urllib.parse
    import urllib.request

    form = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        with (opener or urllib.request.build_opener()).open(url + "login", data=form, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


BENCH_USER, BENCH_PASSWORD = "bench", "bench-password"
BOMB_REPEATS = 3  # each format bomb sent this many times to /critique (after BOMB_WARMUP_CALLS)
BOMB_WARMUP_CALLS = 60


def bench_doors(work: Path) -> list[Row]:
    """The app with a login: bad calls on the queue and REST routes, format bombs, wrong logins."""
    import http.cookiejar
    import urllib.request

    app = AppProcess(work / "app", env={"IMG_STUDIO_AUTH": f"{BENCH_USER}:{BENCH_PASSWORD}"})
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    rows = []
    try:
        assert login(app.url, BENCH_USER, BENCH_PASSWORD, opener) == 200
        cases = bad_app_inputs(work)
        cases += [("prompt with a lone surrogate", "/generate", ["a \ud800 horse", 0]),
                  ("refine: a file record outside the upload cache", "/refine",
                   [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, APP_PROMPT, "", 0]),
                  ("critique: a file record with a URL", "/critique",
                   [{"url": "http://127.0.0.1:9/x.png", "meta": {"_type": "gradio.FileData"}}, APP_PROMPT])]
        clean = {"queue": 0, "REST": 0}
        same, unclean, differ = 0, [], []
        for case, endpoint, arguments in cases:
            if isinstance(arguments, list):
                arguments = [upload(app.url, a, opener) if isinstance(a, Path) else a for a in arguments]
            name = endpoint.lstrip("/")
            answers = {"queue": queue_call(app.url, arguments, api_name=name, opener=opener,
                                           session_hash=f"doors{time.monotonic_ns()}"),
                       "REST": rest_call(app.url, arguments, name, opener)}
            for route, (ok, message) in answers.items():
                good, why = clean_refusal(message, app) if not ok else (False, "accepted")
                clean[route] += good
                if not good:
                    unclean.append(f"{route} {case}: {why or short(str(message), 50)}")
            if answers["queue"][1] == answers["REST"][1]:
                same += 1
            else:
                differ.append(case)
        for route in ("queue", "REST"):
            rows.append(Row("doors", f"{len(cases)} bad API calls, {route} route", "all refused with a sentence",
                            f"{clean[route]} refused cleanly", clean[route] == len(cases),
                            "; ".join(u for u in unclean if u.startswith(route)) or "no bare error, no path"))
        rows.append(Row("doors", "queue vs REST messages", "the same", f"{same} of {len(cases)} the same",
                        same == len(cases), ", ".join(differ)))

        bombs = format_bombs()
        paths = []
        for index, data in enumerate(bombs.values()):
            paths.append(work / f"bomb-{index}.bin")
            paths[-1].write_bytes(data)
        for call in range(BOMB_WARMUP_CALLS):  # the first refusals grow RSS by ~150 MB (code, caches), bombs or not
            queue_call(app.url, [upload(app.url, paths[call % len(paths)], opener), APP_PROMPT], api_name="critique",
                       opener=opener, session_hash=f"warm{call}")
        rss_before, refused, answers = app.rss_mb(), 0, []
        for path in paths:
            for _ in range(BOMB_REPEATS):
                start = time.perf_counter()
                ok, message = queue_call(app.url, [upload(app.url, path, opener), APP_PROMPT], api_name="critique",
                                         opener=opener, session_hash=f"bomb{time.monotonic_ns()}")
                answers.append(time.perf_counter() - start)
                refused += (not ok) and clean_refusal(message, app)[0]
        calls = len(bombs) * BOMB_REPEATS
        rows.append(Row("doors", f"{calls} format bombs to /critique after {BOMB_WARMUP_CALLS}", "refused; RSS grows < 20 MB",
                        f"{refused} refused, RSS {rss_before:.0f} -> {app.rss_mb():.0f} MB",
                        refused == calls and app.rss_mb() - rss_before < 20,
                        f"{1e3 * sum(answers) / calls:.0f} ms per call (upload included); each a new session (~0.1 MB)"))

        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()
        with ThreadPoolExecutor(50) as pool:  # a parallel burst: all 200 sent at once
            burst = list(pool.map(lambda attempt: login(app.url, BENCH_USER, f"burst{attempt}"), range(200)))
        seconds = time.perf_counter() - start
        rows.append(Row("doors", "200 wrong logins sent in parallel", "at most 5 answered, the rest HTTP 429",
                        f"{burst.count(400)} answered, {burst.count(429)} x 429",
                        burst.count(400) <= 5 and burst.count(400) + burst.count(429) == 200,
                        f"{seconds:.2f} s; one try per address is checked at a time"))
    finally:
        status = app.stop()
    rows.append(Row("doors", "SIGTERM", "exit 0", f"exit {status}", status == 0))
    return rows


SESSION_CALLS = 300


def bench_sessions(work: Path) -> list[Row]:
    """RSS and files per 100 /generate calls from new sessions with distinct seeds, idle sessions kept or freed."""
    rows = []
    for label, idle in (("kept (as before)", "1e9"), ("freed after 2 s idle", "2")):
        app = AppProcess(work / f"idle-{idle}", "--session-idle-seconds", idle)
        try:
            for call in range(APP_WARMUP_CALLS):
                queue_call(app.url, [APP_PROMPT, 10_000 + call], api_name="generate", session_hash=f"warm{call}")
            rss, files = [app.rss_mb()], [len(app.files())]
            start = time.perf_counter()
            for call in range(1, SESSION_CALLS + 1):
                ok, _ = queue_call(app.url, [APP_PROMPT, call], api_name="generate", session_hash=f"s{idle}-{call}")
                if call % 100 == 0:
                    rss.append(app.rss_mb())
                    files.append(len(app.files()))
            seconds = time.perf_counter() - start
            time.sleep(35)  # one sweep after the last call
            rss_end = app.rss_mb()
        finally:
            status = app.stop()
        per_100 = (rss[-1] - rss[0]) / (SESSION_CALLS / 100)
        rows.append(Row("sessions", f"{SESSION_CALLS} new API sessions, idle sessions {label}",
                        "RSS grows < 5 MB/100 sessions" if idle == "2" else "(reference)",
                        f"{per_100:+.1f} MB/100 sessions", per_100 < 5 or idle != "2",
                        f"RSS per 100: {' '.join(f'{r:.0f}' for r in rss)} MB, {rss_end:.0f} MB 35 s later; files "
                        f"{' '.join(map(str, files))}; {seconds / SESSION_CALLS * 1e3:.0f} ms/call; exit {status}"))
    return rows


def bench_sigterm(work: Path) -> list[Row]:
    """SIGTERM while a page job runs and an API call waits in the queue."""
    from gradio_client import Client

    app = AppProcess(work / "app")
    try:
        visitor = Client(app.url, verbose=False)
        visitor.predict(APP_PROMPT, 1, api_name="/generate")
        event = next(d for d in visitor.config["dependencies"] if d.get("api_name") == "ui_generate")
        components = {c["id"]: c for c in visitor.config["components"]}
        values = {"prompt": APP_PROMPT, "seed": 3, "steps": 200}
        arguments = [values.get((components[i]["props"].get("elem_id") or "").replace("-", "_"),
                                components[i]["props"].get("value"))
                     for i in event["inputs"] if components[i]["type"] != "state"]
        job = visitor.submit(*arguments, api_name="/ui_generate")
        deadline = time.monotonic() + 60
        while len(job.outputs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = Client(app.url, verbose=False).submit(APP_PROMPT, 2, api_name="/generate")
        time.sleep(0.5)
        start = time.perf_counter()
        app.process.terminate()
        final = job.result(timeout=60)
        page_told = next((str(v) for v in final if "shutting down" in str(v)), "")
        try:
            waiting.result(timeout=60)
            api_told = "accepted"
        except Exception as error:  # noqa: BLE001 - the message is the outcome
            api_told = str(error)
        status = app.process.wait(timeout=60)
        seconds = time.perf_counter() - start
    finally:
        if app.alive:
            app.process.kill()
            app.process.wait()
    log = app.log_path.read_text()
    left = app.files()
    return [
        Row("sigterm", "SIGTERM during a 200-step page job", "exit 0 in < 20 s, nothing left",
            f"exit {status} after {seconds:.1f} s, {len(left)} files left",
            status == 0 and seconds < 20 and not left and "terminate called" not in log),
        Row("sigterm", "the running page job", "stopped with a message", "told" if page_told else "not told",
            bool(page_told), short(page_told.replace("*", ""), 100)),
        Row("sigterm", "an API call waiting in the queue", "refused with a message",
            "told" if "shutting down" in api_told else "not told", "shutting down" in api_told, short(api_told, 100)),
    ]


# ----------------------------------------------------------------------------------------- main

SECTIONS = {"checkpoints": bench_checkpoints, "store": bench_store, "images": bench_images, "app": bench_app,
            "doors": bench_doors, "sessions": bench_sessions, "sigterm": bench_sigterm}


def print_table(rows: list[Row]) -> None:
    headers = ("section", "case", "expected", "observed", "ok", "detail")
    table = [(r.section, r.case, r.expected, r.observed, "yes" if r.ok else "NO", r.detail) for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers[:-1])]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)) + "  " + headers[-1]
    print(line)
    print("-" * len(line))
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("trainer").setLevel(logging.WARNING)  # the fallback warnings are part of the outcome
    torch.set_num_threads(1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        for name in args.sections:
            start = time.perf_counter()
            work = Path(tmp) / name
            work.mkdir()
            section_rows = SECTIONS[name](work)
            for row in section_rows:  # paths relative to the section's scratch folder
                row.detail = short(row.detail.replace(str(work) + "/", ""))
            rows += section_rows
            print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print_table(rows)
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} outcomes as wanted")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
