"""`python app.py --preset tiny-sdxl` in a subprocess on 127.0.0.1, driven with gradio_client."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A green banana and a brown horse."
SEED = 11
START_TIMEOUT_S = 120
APP_LOGS: dict[str, Path] = {}  # url -> the app's stdout+stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def mean_abs_diff(a, b) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_root):
    """The app as a user starts it, on a free local port; its log is printed if it fails to start."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    command = [sys.executable, "app.py", "--preset", "tiny-sdxl", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.25)
        APP_LOGS[url] = log_path
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(app_url) -> Client:
    return Client(app_url, verbose=False)


def test_generate_critique_edit_and_refine_twice(client):
    original = client.predict(PROMPT, SEED, api_name="/generate")
    assert pixels(original).shape == (64, 64, 3)

    critique = client.predict(handle_file(original), PROMPT, api_name="/critique")
    assert isinstance(critique, str) and critique.strip()
    edited = "The horse is missing: add a brown horse standing next to a bright green banana."

    first = client.predict(handle_file(original), PROMPT, edited, SEED, api_name="/refine")
    second_critique = client.predict(handle_file(first), PROMPT, api_name="/critique")
    second = client.predict(handle_file(first), PROMPT, second_critique, SEED, api_name="/refine")
    unedited = client.predict(handle_file(original), PROMPT, critique, SEED, api_name="/refine")

    assert mean_abs_diff(original, first) > 0, "round 1 equals round 0"
    assert mean_abs_diff(first, second) > 0, "round 2 equals round 1"
    assert mean_abs_diff(first, unedited) > 0, "editing the critique did not change the refined image"
    again = client.predict(handle_file(original), PROMPT, edited, SEED, api_name="/refine")
    assert mean_abs_diff(first, again) == 0, "same image, critique and seed gave another image"


def test_bad_inputs_are_errors_and_the_server_keeps_answering(client, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (30, 160, 40)).save(good)
    bad_calls = [
        (("", SEED), "/generate", "prompt is empty"),
        (("   ", SEED), "/generate", "prompt is empty"),
        ((None, PROMPT), "/critique", "no image was given"),
        ((handle_file(str(not_image)), PROMPT), "/critique", "not an image"),
        ((handle_file(str(good)), ""), "/critique", "prompt is empty"),
        ((None, PROMPT, "", SEED), "/refine", "no image was given"),
        ((handle_file(str(not_image)), PROMPT, "", SEED), "/refine", "not an image"),
        ((handle_file(str(good)), "", "", SEED), "/refine", "prompt is empty"),
    ]
    for args, endpoint, message in bad_calls:
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name=endpoint)
    refined = client.predict(handle_file(str(good)), PROMPT, "", SEED, api_name="/refine")
    assert pixels(refined).shape == (64, 64, 3)
    assert client.predict(PROMPT, SEED + 1, api_name="/generate")


def ui_call(client: Client, api_name: str, **values) -> dict:
    """Call one of the UI's own events (stateful, undocumented, positional) with widget values given by
    elem_id (dashes as underscores; widgets not named keep their page defaults). Returns the newest value
    of each output over every update the event streamed, keyed the same way."""
    config = client.config
    event = next(d for d in config["dependencies"] if d.get("api_name") == api_name.lstrip("/"))
    components = {c["id"]: c for c in config["components"]}

    def name(component_id: int) -> str:
        return (components[component_id]["props"].get("elem_id") or str(component_id)).replace("-", "_")

    args = []
    for component_id in event["inputs"]:
        component = components[component_id]
        if component["type"] == "state":
            continue  # the session's own gr.State stays on the server
        args.append(values.get(name(component_id), component["props"].get("value")))
    job = client.submit(*args, api_name=api_name)
    job.result()
    outputs = [name(i) for i in event["outputs"] if components[i]["type"] not in ("state", "button")]  # as the client
    newest: dict = {}
    for update in job.outputs():
        assert len(update) == len(outputs)
        for key, value in zip(outputs, update):
            if isinstance(value, dict) and value.get("__type__") == "update":
                value = value.get("value")  # an update with no new value: keep what came before
            if value is not None:
                newest[key] = value
    return newest


def zipped_rounds(client: Client) -> tuple[list[str], dict]:
    """(file names, session.json) of the zip a click on Download gives this session now."""
    with zipfile.ZipFile(client.predict(api_name="/ui_download")) as bundle:
        return sorted(bundle.namelist()), json.loads(bundle.read("session.json"))


def test_each_browser_session_keeps_its_own_rounds(app_url):
    """Two clients are two sessions: rounds made in one never appear in the other; the download of each
    always holds that session's rounds so far."""
    alice, bob = Client(app_url, verbose=False), Client(app_url, verbose=False)
    alice_first = ui_call(alice, "/ui_generate", prompt=PROMPT, seed=1, steps=2)
    bob_first = ui_call(bob, "/ui_generate", prompt="a rubber ball and a metallic car", seed=2, steps=2)
    assert zipped_rounds(alice)[0] == zipped_rounds(bob)[0] == ["round_0.png", "session.json"]
    critique = ui_call(alice, "/ui_critique", prompt=PROMPT)["critique"]
    assert critique.strip()
    ui_call(
        alice, "/ui_refine", prompt=PROMPT, seed=1, steps=2, guidance_mode="dialogue", critique="Add a horse."
    )
    names, record = zipped_rounds(alice)
    assert names == ["round_0.png", "round_1.png", "session.json"]
    assert record["prompt"] == PROMPT and record["rounds"][1]["critique"] == "Add a horse."
    assert 0.0 <= record["rounds"][1]["scores"]["vqascore"] <= 1.0
    bob_second = ui_call(bob, "/ui_refine", prompt="a rubber ball and a metallic car", seed=2, steps=2)
    names, record = zipped_rounds(bob)
    assert names == ["round_0.png", "round_1.png", "session.json"], "bob sees alice's rounds"
    assert record["prompt"] == "a rubber ball and a metallic car"
    assert mean_abs_diff(alice_first["current_image"], bob_first["current_image"]) > 0
    assert "loaded" in bob_second["status"] and "not loaded" not in bob_second["status"]


def test_a_bad_click_leaves_the_session_usable(app_url):
    """The UI's events answer a mistake with a message (no error) and keep the rounds."""
    client = Client(app_url, verbose=False)
    ui_call(client, "/ui_generate", prompt=PROMPT, seed=3, steps=2)
    logged_before = len(APP_LOGS[app_url].read_text())
    refused = ui_call(client, "/ui_refine", prompt="   ", seed=3, steps=2)
    assert "prompt is empty" in refused["status"]
    log = APP_LOGS[app_url].read_text()[logged_before:]  # what this click logged
    assert "Traceback" not in log, "a user mistake is one log line, not a traceback"
    assert [line for line in log.splitlines() if "refused" in line] == [
        "Refine refused: the prompt is empty: describe the image you want"
    ]
    ui_call(client, "/ui_refine", prompt=PROMPT, seed=3, steps=2)
    assert zipped_rounds(client)[0] == ["round_0.png", "round_1.png", "session.json"]
