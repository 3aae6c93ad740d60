"""Hardening of the app, its API and the CLI (issue 10: findings 5, 6 and 8; issue 19: the REST route,
login throttling, credentials, the app folder's lock, graceful SIGTERM, idle sessions, empty --out).

One `python app.py --preset tiny-sdxl` subprocess (a login from $IMG_STUDIO_AUTH) for the module, with
its own TMPDIR so that every file it writes can be counted; the login-throttle test and the idle SIGTERM
test come last among its users. Plain HTTP calls go through Gradio's queue (`queue_call`) and its REST
route (`rest_call`) as any script can, without gradio_client's checks. The busy-SIGTERM test starts its
own app.
"""

import argparse
import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A green banana and a brown horse."
USER, PASSWORD = "tester", "s3cret:with-colon"
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningApp:
    def __init__(self, tmp: Path):
        self.tmp = tmp / "tmpdir"  # the app's TMPDIR: everything it writes should be under it
        self.tmp.mkdir()
        self.log = tmp / "app.log"
        self.url = f"http://127.0.0.1:{free_port()}/"
        env = dict(os.environ, TMPDIR=str(self.tmp), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", IMG_STUDIO_AUTH=f"{USER}:{PASSWORD}")  # not in ps
        env.pop("GRADIO_TEMP_DIR", None)
        port = urllib.parse.urlparse(self.url).port
        command = [sys.executable, "app.py", "--preset", "tiny-sdxl", "--device", "cpu", "--host", "127.0.0.1",
                   "--port", str(port)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"app.py exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # answering (a login page or 401): up
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within {START_TIMEOUT_S} s:\n{self.log.read_text()}")
            time.sleep(0.25)
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        login = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
        self.opener.open(self.url + "login", data=login, timeout=10).close()
        self.config = json.loads(self.opener.open(self.url + "config", timeout=10).read())

    def files(self) -> list[Path]:
        return sorted(p for p in self.tmp.rglob("*") if not p.is_dir())

    def fn_index(self, api_name: str) -> int:
        return next(i for i, d in enumerate(self.config["dependencies"]) if d.get("api_name") == api_name)

    def queue_call(self, data, api_name: str | None = None, fn_index: int | None = None) -> tuple[bool, object]:
        """One event over plain HTTP: (True, output data) or (False, the error message a client sees)."""
        ok, result, _ = self.queue_call_with_log(data, api_name, fn_index)
        return ok, result

    def queue_call_with_log(self, data, api_name: str | None = None, fn_index: int | None = None):
        """`queue_call`, plus the (level, message) notes (gr.Warning, gr.Info) the event sent."""
        session_hash = f"test{time.monotonic_ns()}"
        body = {"data": data, "fn_index": self.fn_index(api_name) if fn_index is None else fn_index,
                "session_hash": session_hash, "event_data": None, "trigger_id": None}
        request = urllib.request.Request(self.url + "gradio_api/queue/join", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            self.opener.open(request, timeout=30).close()
        except urllib.error.HTTPError as error:
            return False, f"HTTP {error.code}: {error.read().decode(errors='replace')}", []
        logs = []
        with self.opener.open(f"{self.url}gradio_api/queue/data?session_hash={session_hash}", timeout=120) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "log":
                    logs.append((message.get("level"), message.get("log")))
                if message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    if message.get("success"):
                        return True, output.get("data"), logs
                    return False, output.get("error"), logs
        return False, "no result", logs

    def rest_call(self, data, api_name: str) -> tuple[bool, object]:
        """One event over Gradio's REST route (POST /gradio_api/call/NAME, then its event stream); a dict
        of named values goes to /gradio_api/call/v2/NAME."""
        route = f"gradio_api/call/v2/{api_name}" if isinstance(data, dict) else f"gradio_api/call/{api_name}"
        body = data if isinstance(data, dict) else {"data": data}
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            event_id = json.loads(self.opener.open(request, timeout=30).read())["event_id"]
        except urllib.error.HTTPError as error:
            return False, f"HTTP {error.code}: {error.read().decode(errors='replace')}"
        event = None
        with self.opener.open(self.url + f"{route}/{event_id}", timeout=120) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line[5:])
                    if event == "complete":
                        return True, payload
                    return False, payload.get("error") if isinstance(payload, dict) else payload
        return False, "no result"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_root):
    running = RunningApp(tmp_path_factory.mktemp("hardening"))
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, auth=(USER, PASSWORD), verbose=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 64), (30, 160, 40)).save(folder / "good.png")
    (folder / "notes.png").write_text("this is text, not a picture")
    return {"good": folder / "good.png", "not_image": folder / "notes.png"}


def assert_clean_message(message: object, *must_contain: str) -> None:
    """A sentence for the client: not a bare 'Error'/None, no traceback, no server path."""
    text = str(message)
    assert text.strip() not in ("", "None", "Error", "null"), f"bare error: {text!r}"
    assert "Traceback" not in text and "/tmp" not in text and str(ROOT) not in text, text
    for part in must_contain:
        assert part in text, f"{part!r} not in {text!r}"


# --- finding 6: nobody changes the server for everyone ----------------------------------------------


def test_without_credentials_the_app_answers_401(app):
    for path in ("config", "gradio_api/info"):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(app.url + path, timeout=10)
        assert raised.value.code == 401
    join = urllib.request.Request(app.url + "gradio_api/queue/join", data=b'{"data": [], "fn_index": 0, '
                                  b'"session_hash": "x"}', headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(join, timeout=10)
    assert raised.value.code == 401


def test_auth_flag_parsing(capsys):
    import app as app_module

    assert app_module.parse_auth("ann:pa:ss") == ("ann", "pa:ss")
    for bad in ("ann", ":pass", "ann:", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="USER:PASS"):
            app_module.parse_auth(bad)
    with pytest.raises(SystemExit) as raised:
        app_module.parse_args(["--auth", "nocolon"])
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1 and "USER:PASS" in err[0] and "--help" in err[0]
    assert app_module.parse_args(["--share"]).allow_model_switch is False
    warnings = app_module.exposure_warnings(app_module.parse_args(["--share"]))
    assert len(warnings) == 1 and "public" in warnings[0] and "--auth" in warnings[0]
    warnings = app_module.exposure_warnings(app_module.parse_args(["--host", "0.0.0.0", "--auth", "a:b"]))
    assert len(warnings) == 2 and "0.0.0.0" in warnings[1] and "--auth" not in warnings[1]
    assert "ps" in warnings[0], "--auth on the command line is visible to every user"


def test_space_variables_set_the_model_defaults(monkeypatch):
    import app as app_module

    monkeypatch.setenv("IMG_PRESET", "tiny-flux")
    monkeypatch.setenv("IMG_MLLM", "tiny-qwen")
    monkeypatch.setenv("IMG_QUANTIZATION", "none")
    args = app_module.parse_args([])
    assert (args.preset, args.mllm, args.quantization) == ("tiny-flux", "tiny-qwen", "none")
    assert app_module.parse_args(["--preset", "tiny-sdxl"]).preset == "tiny-sdxl", "a flag beats the variable"
    monkeypatch.setenv("IMG_PRESET", "")
    assert app_module.parse_args([]).preset is None, "empty means unset"


def test_model_switch_is_refused_on_the_server(tiny_root):
    from img_core.errors import IMGError
    from img_core.session import IMGSession
    from ui.models import ModelHost

    host = ModelHost(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False))
    with pytest.raises(IMGError, match="--allow-model-switch"):
        host.switch("tiny-flux", None, None)
    assert host.preset.name == "tiny-sdxl" and not host.is_loaded


def test_model_switch_over_plain_http_is_refused(app):
    """The switch event may be hidden from the page and the API docs; a direct call to its fn_index
    must still not switch (the app was started without --allow-model-switch)."""
    components = {c["id"]: c for c in app.config["components"]}
    presets_of = {
        i: components[i]["props"].get("choices") for i in components if components[i]["type"] == "dropdown"
    }
    switches = [
        (index, dependency) for index, dependency in enumerate(app.config["dependencies"])
        if len(dependency["inputs"]) >= 2 and all(i in presets_of for i in dependency["inputs"])
    ]
    for index, dependency in switches:
        data = []
        for component_id in dependency["inputs"]:
            choices = [c[1] if isinstance(c, list) else c for c in presets_of[component_id] or []]
            data.append("tiny-flux" if "tiny-flux" in choices else None)
        ok, message = app.queue_call(data, fn_index=index)
        text = json.dumps(message)
        assert "--allow-model-switch" in text, f"event {index} answered {text[:300]}"
    ok, image = app.queue_call([PROMPT, 1], api_name="generate")
    assert ok, image


# --- finding 8: the API refuses malformed values with a message ---------------------------------------


@pytest.mark.parametrize("seed", [1.5, True, "x", "7", float("nan"), [1], -1, 2**32, None])
def test_api_seed_must_be_a_whole_number_in_range(app, seed):
    ok, message = app.queue_call([PROMPT, seed], api_name="generate")
    assert not ok, f"seed {seed!r} was accepted"
    assert_clean_message(message, "seed")


def test_api_prompts_and_critiques_must_be_text(app, client, images):
    for prompt in (123, ["a"], {"text": "a"}):
        ok, message = app.queue_call([prompt, 0], api_name="generate")
        assert not ok and "prompt must be text" in str(message), message
    with pytest.raises(Exception) as raised:
        client.predict(handle_file(str(images["good"])), 5, api_name="/critique")
    assert_clean_message(raised.value, "prompt must be text")
    with pytest.raises(Exception) as raised:
        client.predict(handle_file(str(images["good"])), PROMPT, 5, 0, api_name="/refine")
    assert_clean_message(raised.value, "critique must be text")


def test_api_critique_caps_the_prompt_like_the_others(app, client, images):
    from img_core.settings import MAX_PROMPT_CHARS

    long_prompt = "a horse " * (MAX_PROMPT_CHARS // 4)
    ok, image, logs = app.queue_call_with_log([long_prompt, 0], api_name="generate")
    assert ok and any(level == "warning" and "cut" in text for level, text in logs), logs
    image_file = {"path": image[0]["path"], "meta": {"_type": "gradio.FileData"}}  # the served output
    ok, critique, logs = app.queue_call_with_log([image_file, long_prompt], api_name="critique")
    assert ok and isinstance(critique[0], str), critique
    assert any(level == "warning" and "cut" in text for level, text in logs), f"/critique did not cap: {logs}"


@pytest.mark.parametrize("data", [[], [PROMPT]])
def test_api_missing_arguments_get_a_message(app, data):
    ok, message = app.queue_call(data, api_name="generate")
    assert not ok
    assert_clean_message(message)


def test_api_messages_never_contain_server_paths(app, client, images):
    for arguments, endpoint in [
        ((handle_file(str(images["not_image"])), PROMPT), "/critique"),
        ((handle_file(str(images["not_image"])), PROMPT, "", 0), "/refine"),
    ]:
        with pytest.raises(Exception) as raised:
            client.predict(*arguments, api_name=endpoint)
        assert_clean_message(raised.value, "not an image")
        assert "notes.png" not in str(raised.value) and "gradio" not in str(raised.value)
    ok, message = app.queue_call(["/etc/hostname", PROMPT], api_name="critique")  # a server path as text
    assert not ok
    assert_clean_message(message, "no image was given")


REST_AND_QUEUE_CASES = [
    ("no values", "generate", [], "the prompt is empty"),
    ("seed missing", "generate", [PROMPT], "the seed is missing"),
    ("seed 1.5", "generate", [PROMPT, 1.5], "seed must be a whole number"),
    ("prompt 123", "generate", [123, 0], "prompt must be text"),
    ("a lone surrogate", "generate", ["a\ud800b", 0], "half of a UTF-16 pair"),
    ("a server path as text", "critique", ["/etc/hostname", PROMPT], "no image was given"),
    ("a file record outside the uploads", "critique",
     [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, PROMPT], "no image was given"),
    ("a file record with a URL", "critique",
     [{"url": "http://127.0.0.1:9/x.png", "meta": {"_type": "gradio.FileData"}}, PROMPT], "no image was given"),
    ("a record without meta", "refine", [{"path": "/etc/passwd"}, PROMPT, "", 0], "no image was given"),
    ("refine: seed missing", "refine", [None, PROMPT, ""], "the seed is missing"),
]


@pytest.mark.parametrize("case, api_name, data, expected", REST_AND_QUEUE_CASES, ids=[c[0] for c in REST_AND_QUEUE_CASES])
def test_rest_and_queue_routes_give_the_same_message(app, case, api_name, data, expected):
    """The REST route (/gradio_api/call/NAME) gets the same input guard as the queue: one sentence, the
    same on both, never Gradio's `{"error": null}`."""
    answers = [app.queue_call(data, api_name=api_name), app.rest_call(data, api_name)]
    for ok, message in answers:
        assert not ok, f"{case}: accepted"
        assert_clean_message(message, expected)
    assert answers[0][1] == answers[1][1], f"{case}: queue {answers[0][1]!r} but REST {answers[1][1]!r}"


NAMED_VALUE_CASES = [  # /gradio_api/call/v2/NAME takes {"name": value}
    ("v2: no values", "generate", {}, "the seed is missing|the prompt is empty"),
    ("v2: seed missing", "generate", {"prompt": PROMPT}, "the seed is missing"),
    ("v2: a file record outside the uploads", "critique",
     {"image": {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, "prompt": PROMPT}, "no image was given"),
    ("v2: refine without a seed", "refine", {"image": None, "prompt": PROMPT, "critique": ""}, "the seed is missing"),
]


@pytest.mark.parametrize("case, api_name, values, expected", NAMED_VALUE_CASES, ids=[c[0] for c in NAMED_VALUE_CASES])
def test_named_values_get_the_same_guard(app, case, api_name, values, expected):
    """/gradio_api/call/v2/NAME with values missing: a sentence, as on the other routes (it was HTTP 500
    and a traceback in the server's log)."""
    ok, message = app.rest_call(values, api_name)
    assert not ok, f"{case}: accepted"
    assert_clean_message(message)
    assert re.search(expected, str(message)), f"{case}: {message!r}"


@pytest.mark.parametrize("route", ["gradio_api/call/nothing", "gradio_api/call/v2/nothing", "gradio_api/run/nothing",
                                   "gradio_api/queue/join"])
def test_a_call_to_an_endpoint_that_does_not_exist_gets_404_and_the_names_that_do(app, route):
    body = {"data": [PROMPT, 0], "fn_index": 999, "session_hash": "x"} if route.endswith("join") else {"data": [PROMPT, 0]}
    request = urllib.request.Request(app.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        app.opener.open(request, timeout=30)
    assert raised.value.code == 404
    detail = json.loads(raised.value.read())["detail"]
    assert_clean_message(detail, "no API endpoint", "/critique, /generate, /refine")


def test_a_served_output_is_still_a_valid_input(app):
    """The guard lets through file records inside Gradio's folder (an output of an earlier call)."""
    ok, image = app.rest_call([PROMPT, 4], "generate")
    assert ok, image
    record = {"path": image[0]["path"], "meta": {"_type": "gradio.FileData"}}
    ok, critique = app.rest_call([record, PROMPT], "critique")
    assert ok and isinstance(critique[0], str) and critique[0], critique


# --- finding 5: bounded resources ------------------------------------------------------------------


def test_api_calls_leave_no_files_behind(app, client, images):
    good = handle_file(str(images["good"]))
    client.predict(good, PROMPT, "", 3, api_name="/refine")  # first call: cached upload and output
    client.predict(good, PROMPT, api_name="/critique")
    before = app.files()
    for _ in range(4):
        client.predict(handle_file(str(images["good"])), PROMPT, "", 3, api_name="/refine")
        client.predict(handle_file(str(images["good"])), PROMPT, api_name="/critique")
    after = app.files()
    assert [p for p in after if p not in before] == [], "files added by repeated identical calls"
    folders = {p.relative_to(app.tmp).parts[0] for p in after}
    assert folders <= {"img-studio-app"}, f"files outside the app's folder: {folders}"


def test_export_keeps_one_zip_per_session_and_removes_it_at_the_end(tiny_root):
    from img_core.record import Round
    from img_core.session import IMGSession
    from ui.handlers import Studio
    from ui.models import ModelHost
    from ui.state import StudioState

    studio = Studio(ModelHost(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False)))
    first = Round(index=0, image=Image.new("RGB", (64, 64), (200, 30, 30)), prompt=PROMPT, seed=0, source="uploaded")
    state = StudioState().started(first)
    zips = [studio.export(state, "session-a") for _ in range(2)]
    other = studio.export(state, "session-b")
    assert all(z.is_file() for z in (zips[1], other))
    assert list(zips[1].parent.iterdir()) == [zips[1]], "a second download must replace the first"
    studio.end_session("session-a")
    assert not zips[1].parent.exists() and other.is_file()
    studio.end_session("session-b")
    assert not other.parent.exists()


def test_a_browser_session_zip_is_removed_when_the_session_ends(app):
    """Download writes the session's zip; closing the session (the heartbeat stops, as when a tab closes)
    removes it."""
    visitor = Client(app.url, auth=(USER, PASSWORD), verbose=False)
    event = next(d for d in visitor.config["dependencies"] if d.get("api_name") == "ui_generate")
    components = {c["id"]: c for c in visitor.config["components"]}
    values = {"prompt": PROMPT, "seed": 5}
    args = [values.get((components[i]["props"].get("elem_id") or "").replace("-", "_"), components[i]["props"].get(
        "value")) for i in event["inputs"] if components[i]["type"] != "state"]
    visitor.submit(*args, api_name="/ui_generate").result()
    visitor.submit(api_name="/ui_download").result()
    folders = [p for p in app.tmp.rglob(f"exports/{visitor.session_hash}") if p.is_dir()]
    assert len(folders) == 1 and [p.suffix for p in folders[0].iterdir()] == [".zip"], folders
    visitor.close()
    deadline = time.monotonic() + 20
    while folders[0].exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folders[0].exists(), "the session's zip outlived the session"


LOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_app_start_removes_only_folders_whose_lock_nobody_holds(tmp_path):
    """A running app's folder survives another app's start-up even when its name is a process id that
    does not exist here (an app in another container, another PID namespace); unlocked folders go."""
    from ui.files import LOCK_NAME, remove_stale_folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (str(dead.pid), "left-by-kill-9", str(dead.pid + 1_000_000)):
        (tmp_path / name / "gradio").mkdir(parents=True)
        (tmp_path / name / "gradio" / "image.png").write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / str(dead.pid) / LOCK_NAME)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed = remove_stale_folders(tmp_path)
        assert sorted(p.name for p in removed) == sorted(["left-by-kill-9", str(dead.pid + 1_000_000)])
        assert (tmp_path / str(dead.pid) / "gradio" / "image.png").is_file(), "a running app's folder was removed"
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert remove_stale_folders(tmp_path) == [tmp_path / str(dead.pid)], "its lock is free once the app ended"


def test_two_apps_folders_are_locked_and_removed_at_exit(tmp_path):
    """`open_app_folder` in two processes: each holds its own folder's lock; each removes only its own."""
    script = (
        "import sys; from pathlib import Path; from ui.files import open_app_folder; "
        "print(open_app_folder(Path(sys.argv[1])), flush=True); sys.stdin.read()"
    )
    apps = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    folders = [Path(app.stdout.readline().strip()) for app in apps]
    assert folders[0] != folders[1] and all(folder.is_dir() for folder in folders)
    from ui.files import remove_stale_folders

    assert remove_stale_folders(tmp_path) == []
    apps[0].stdin.close()
    apps[0].wait(timeout=30)
    assert not folders[0].exists() and folders[1].is_dir()
    apps[1].kill()  # kill -9: no exit handler runs; the kernel drops the lock
    apps[1].wait()
    assert remove_stale_folders(tmp_path) == [folders[1]]


def login(app, password: str) -> int:
    """The HTTP status of one login try on the app's page."""
    form = urllib.parse.urlencode({"username": USER, "password": password}).encode()
    try:
        with urllib.request.urlopen(app.url + "login", data=form, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_wrong_logins_are_throttled(app):
    """Next to last in this module (it makes this address wait): 5 wrong passwords are answered, then
    each try must wait 1, 2, 4, ... s, a right password too; after the wait the right one opens."""
    from ui.api_inputs import FREE_LOGIN_FAILURES

    start = time.perf_counter()
    assert [login(app, f"wrong{i}") for i in range(FREE_LOGIN_FAILURES)] == [400] * FREE_LOGIN_FAILURES
    assert login(app, "wrong") == 429 and login(app, PASSWORD) == 429, "no delay after 5 wrong logins"
    time.sleep(1.1)
    assert login(app, "wrong") == 400  # the 6th: now 2 s to wait
    assert login(app, PASSWORD) == 429
    time.sleep(2.1)
    assert login(app, PASSWORD) == 200
    assert login(app, "wrong") == 400, "a right login clears the count"
    assert time.perf_counter() - start < 10


def test_login_delay_doubles_up_to_a_minute():
    from ui.api_inputs import FREE_LOGIN_FAILURES, MAX_LOGIN_DELAY_S, LoginThrottle

    throttle = LoginThrottle(app=None)
    for _ in range(FREE_LOGIN_FAILURES + 20):
        throttle.record("10.0.0.1", success=False, now=1000.0)
    assert throttle.seconds_to_wait("10.0.0.1", now=1000.0) == MAX_LOGIN_DELAY_S
    assert throttle.seconds_to_wait("10.0.0.2", now=1000.0) == 0, "another address is not slowed down"
    assert throttle.seconds_to_wait("10.0.0.1", now=1000.0 + MAX_LOGIN_DELAY_S) == 0


def test_a_parallel_burst_of_logins_is_checked_one_at_a_time():
    """200 wrong logins sent at once from one address: one reaches the password check, the others get
    HTTP 429 at once; then tries one after another are answered until the free failures are used."""
    import asyncio

    from ui.api_inputs import FREE_LOGIN_FAILURES, LoginThrottle

    checked = []

    async def login_page(scope, receive, send):  # Gradio's /login as the throttle sees it: a slow 400
        checked.append(scope["client"][0])
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    throttle = LoginThrottle(login_page)

    async def try_login(address: str) -> int:
        statuses = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "method": "POST", "path": "/login", "client": (address, 4000)}
        await throttle(scope, None, send)
        return statuses[0]

    async def main():
        burst = await asyncio.gather(*(try_login("10.0.0.9") for _ in range(200)), try_login("10.0.0.8"))
        in_turn = [await try_login("10.0.0.9") for _ in range(FREE_LOGIN_FAILURES + 2)]
        return burst, in_turn

    burst, in_turn = asyncio.run(main())
    assert burst[:200].count(400) == 1 and burst[:200].count(429) == 199
    assert burst[200] == 400, "another address is not held up by this one's burst"
    assert in_turn == [400] * (FREE_LOGIN_FAILURES - 1) + [429] * 3, "the burst's one try counted as a failure"
    assert checked.count("10.0.0.9") == FREE_LOGIN_FAILURES


def test_credentials_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    import app as app_module

    monkeypatch.delenv(app_module.AUTH_VARIABLE, raising=False)
    secrets_file = tmp_path / "auth"
    secrets_file.write_text("# who may log in\nann:pa:ss\n\nbob:pw\n")
    args = app_module.parse_args(["--auth-file", str(secrets_file)])
    assert args.auth == [("ann", "pa:ss"), ("bob", "pw")] and app_module.exposure_warnings(args) == []
    monkeypatch.setenv(app_module.AUTH_VARIABLE, "cat:pw")
    assert app_module.parse_args([]).auth == [("cat", "pw")]
    args = app_module.parse_args(["--auth", "dan:pw"])
    assert args.auth == [("dan", "pw")], "a flag beats the variable"
    assert any("ps" in warning and "--auth-file" in warning for warning in app_module.exposure_warnings(args))
    for argv, expected in ((["--auth-file", str(tmp_path / "missing")], "cannot read"),
                           (["--auth-file", str(secrets_file), "--auth", "a:b"], "not both")):
        with pytest.raises(SystemExit):
            app_module.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    secrets_file.write_text("ann\n")
    with pytest.raises(SystemExit):
        app_module.parse_args(["--auth-file", str(secrets_file)])
    assert "line 1: expected USER:PASS" in capsys.readouterr().err


def test_sigterm_removes_everything_the_app_wrote(app):
    """Last in this module: stops the app as a service manager does."""
    assert any(app.files()), "the app wrote nothing to count"
    app.process.send_signal(signal.SIGTERM)
    assert app.process.wait(timeout=30) == 0
    assert app.files() == [], f"left behind: {app.files()[:5]}"


# --- CLI: usage errors and paths (findings 7 and 8) ---------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    from img_core.cli.main import main

    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err.strip().splitlines()


def test_cli_usage_errors_are_one_line_with_a_help_hint(capsys, tmp_path):
    out = str(tmp_path / "out")
    for argv in (
        ["refine", "--prompt", PROMPT, "--out", out, "--preset", "no-such-preset"],
        ["refine", "--prompt", PROMPT, "--out", out, "--seed", "1.5"],
        ["refine", "--out", out],
        ["no-such-command"],
        ["evaluate", "--bogus"],
        ["evaluate-compare"],
        ["prepare", "--preset", "no-such-preset"],
        ["convert-llava", "--bogus"],
    ):
        status, err = cli(capsys, *argv)
        assert status == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith("error: ") and "--help" in err[0], err


def test_cli_names_a_folder_and_a_missing_aligner_before_loading_models(capsys, tmp_path):
    out = str(tmp_path / "out")
    status, err = cli(capsys, "refine", "--prompt", PROMPT, "--out", out, "--preset", "tiny-sdxl", "--image",
                      str(tmp_path))
    assert status == 2 and len(err) == 1 and "is a folder" in err[0], err
    missing = str(tmp_path / "no-such-aligner")
    start = time.perf_counter()
    status, err = cli(capsys, "refine", "--prompt", PROMPT, "--out", out, "--preset", "tiny-sdxl", "--aligner", missing)
    assert status == 2 and len(err) == 1 and "does not exist" in err[0] and "HFValidation" not in err[0], err
    assert time.perf_counter() - start < 5, "a model was loaded before the check"


def test_session_refuses_a_missing_aligner_path(tiny_root, tmp_path):
    from img_core.errors import InvalidInputError
    from img_core.session import IMGSession, check_aligner_source

    for source in (tmp_path / "missing", tmp_path / "aligner.pth", "./runs/final", "/abs/path/folder"):
        with pytest.raises(InvalidInputError, match="does not exist"):
            check_aligner_source(source)
    check_aligner_source("owner/aligner-repo")  # a hub repo id is left to the hub
    check_aligner_source(tmp_path)  # an existing folder
    session = IMGSession.from_preset("tiny-sdxl", device="cpu", aligner=str(tmp_path / "missing"),
                                     show_progress_bars=False)
    with pytest.raises(InvalidInputError, match="does not exist"):
        session._load_aligner()


# --- SIGTERM during a job (issue 19, finding 4) ------------------------------------------------------


def page_arguments(visitor: Client, api_name: str, values: dict) -> list:
    """The values of a page event's inputs in order (widget defaults, `values` by elem_id)."""
    event = next(d for d in visitor.config["dependencies"] if d.get("api_name") == api_name)
    components = {c["id"]: c for c in visitor.config["components"]}
    return [values.get((components[i]["props"].get("elem_id") or "").replace("-", "_"), components[i]["props"].get(
        "value")) for i in event["inputs"] if components[i]["type"] != "state"]


@pytest.mark.slow
def test_sigterm_during_a_job_stops_it_tells_the_clients_and_exits_0(tmp_path, tiny_root):
    """A page job is running (many steps) and an API call waits in the queue: SIGTERM stops the job at
    its next step, both clients get the shutdown message, and the app exits 0 with its files removed."""
    running = RunningApp(tmp_path)
    try:
        visitor = Client(running.url, auth=(USER, PASSWORD), verbose=False)
        visitor.predict(PROMPT, 1, api_name="/generate")  # models loaded: the job below is all steps
        job = visitor.submit(*page_arguments(visitor, "ui_generate", {"prompt": PROMPT, "seed": 3, "steps": 200}),
                             api_name="/ui_generate")
        deadline = time.monotonic() + 60
        while len(job.outputs()) < 2 and time.monotonic() < deadline:  # a stage update: steps are running
            time.sleep(0.05)
        assert len(job.outputs()) >= 2 and not job.done(), "the job did not start, or ended before SIGTERM"
        waiting = Client(running.url, auth=(USER, PASSWORD), verbose=False).submit(PROMPT, 2, api_name="/generate")
        time.sleep(0.5)
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        final = job.result(timeout=60)
        with pytest.raises(Exception) as refused:
            waiting.result(timeout=60)
        status = running.process.wait(timeout=60)
        seconds = time.monotonic() - started
        log = running.log.read_text()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
    assert status == 0, f"exit status {status}:\n{log[-3000:]}"
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]
    assert any("shutting down" in str(value) for value in final), f"the page was not told: {final}"
    assert_clean_message(refused.value, "shutting down")
    assert seconds < 20, f"took {seconds:.1f} s to stop"
    assert running.files() == [], f"left behind: {running.files()[:5]}"


def test_failing_cli_commands_leave_no_empty_out_folder(capsys, tmp_path, tiny_root):
    """--out is created before the models load (to check it early); a command that then fails removes
    the folders it created, but never one that existed or holds a file."""
    from tests.hostile_images import ico_holding

    icon = tmp_path / "icon.ico"
    icon.write_bytes(ico_holding(b"\x89PNG\r\n\x1a\n"))
    nested = tmp_path / "runs" / "a" / "b"
    for argv in (["--scorer", "no-such-scorer"], ["--image", str(icon)], ["--aligner", str(tmp_path / "missing")]):
        status, err = cli(capsys, "refine", "--prompt", PROMPT, "--out", str(nested), "--preset", "tiny-sdxl", *argv)
        assert status == 2 and len(err) == 1, err
        assert not (tmp_path / "runs").exists(), f"{argv}: left {sorted(tmp_path.rglob('*'))}"
    existing = tmp_path / "existing"
    existing.mkdir()
    status, _ = cli(capsys, "refine", "--prompt", PROMPT, "--out", str(existing / "new"), "--scorer", "no-such")
    assert status == 2 and existing.is_dir() and not (existing / "new").exists()


def test_removed_if_left_empty_keeps_folders_with_files(tmp_path):
    from img_core.cli.outputs import removed_if_left_empty

    out = tmp_path / "x" / "y"
    with pytest.raises(RuntimeError), removed_if_left_empty(out):
        out.mkdir(parents=True)
        (out / "round_0.png").write_bytes(b"partial")
        raise RuntimeError("failed after writing")
    assert (out / "round_0.png").is_file(), "a folder with a file is kept"
    with removed_if_left_empty(tmp_path / "ok"):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir(), "success keeps it"


# --- bounded per-session memory (issue 19, finding 6) -------------------------------------------------


def test_idle_api_sessions_are_freed_and_page_sessions_with_state_kept(tmp_path):
    """Every API call from a new client is a Gradio session (~100 KB); idle ones without gr.State values
    go, a session holding state stays."""
    import gradio as gr

    from ui.sessions import remove_idle_sessions

    with gr.Blocks() as demo:
        rounds = gr.State([])
        text = gr.Textbox()
        gr.Button().click(lambda value: value.upper(), text, text, api_name="shout")
        gr.Button().click(lambda kept, value: [*kept, value], [rounds, text], rounds, api_name="keep")
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        url = demo.local_url
        calls = [Client(url, verbose=False) for _ in range(6)]
        for client in calls:
            assert client.predict("hi", api_name="/shout") == "HI"
        keeper = Client(url, verbose=False)
        keeper.predict("x", api_name="/keep")
        sessions = set(demo.state_holder.session_data)
        assert {c.session_hash for c in calls} | {keeper.session_hash} <= sessions
        assert remove_idle_sessions(demo, idle_seconds=60) == 0, "recent sessions must stay"
        removed = remove_idle_sessions(demo, idle_seconds=0)
        assert removed >= 6 and keeper.session_hash in demo.state_holder.session_data
        assert not any(c.session_hash in demo.state_holder.session_data for c in calls)
        assert calls[0].predict("again", api_name="/shout") == "AGAIN", "a freed session can call again"
    finally:
        demo.close()


def test_served_files_age_out_after_the_set_minutes(tiny_root, tmp_path):
    """The default keeps uploads and served results 15 minutes (looked for every 5); with
    --served-files-minutes 0.05 a /generate result's file is gone a few seconds later."""
    import app as app_module
    from img_core.session import IMGSession
    from ui import build_demo, launch_kwargs
    from ui.files import served_files_delete_cache

    assert served_files_delete_cache() == (300, 900)
    assert served_files_delete_cache(0.05) == (1, 3)
    assert app_module.parse_args([]).served_files_minutes == 15
    with pytest.raises(SystemExit):
        app_module.parse_args(["--served-files-minutes", "0"])
    minutes = app_module.parse_args(["--served-files-minutes", "0.05"]).served_files_minutes
    demo = build_demo(IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False),
                      prepare_models=False, served_files_minutes=minutes)  # fmt: skip
    assert demo.delete_cache == (1, 3)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **launch_kwargs())  # fmt: skip
    try:
        request = urllib.request.Request(url + "gradio_api/call/generate", data=json.dumps({"data": [PROMPT, 4]}).encode(),
                                         headers={"Content-Type": "application/json"})
        event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
        with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event_id}", timeout=120) as stream:
            result = next(json.loads(line[5:]) for line in map(bytes.decode, stream) if line.startswith("data:"))
        served = Path(result[0]["path"])  # the server's own copy, in Gradio's folder
        assert served.is_file()
        deadline = time.monotonic() + 20
        while served.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not served.exists(), "the served file outlived its minutes"
    finally:
        demo.close()


