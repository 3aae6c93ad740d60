"""Question sources: our 100 templates, the release's list (cached fetch, offline fallback), user files;
seeded picks, the release's exact fill and our punctuation rule. Offline: the release's text never appears
here (fake lists in its format stand in for it) and the network is only ever a loopback port."""

import hashlib
import http.server
import json
import logging
import socket
import threading

import pytest

from img_core.errors import InvalidInputError
from img_core.questions import (
    PLACEHOLDER,
    QUESTION_SOURCES,
    RELEASE_QUESTIONS_URL,
    fetch_release_questions,
    fill_ours,
    load_question_source,
    load_question_templates,
    pick_question,
    release_questions_cache_path,
)

FAKE_RELEASE = ["Fake question one: {prompt}?", "Fake two, {prompt}?", "Fake question one: {prompt}?"]


def closed_port_url() -> str:
    """A loopback URL nothing listens on: a fetch fails at once, like an offline machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/edit_instructions.json"


def test_templates_are_100_unique_with_one_placeholder():
    templates = load_question_templates()
    assert len(templates) == 100
    assert len(set(templates)) == 100
    assert all(template.count(PLACEHOLDER) == 1 for template in templates)
    assert all(template.strip().endswith(("?", ".")) for template in templates)


def test_source_names_and_release_url_pin_the_commit():
    assert QUESTION_SOURCES == ("ours", "release")
    assert RELEASE_QUESTIONS_URL == (
        "https://raw.githubusercontent.com/SHI-Labs/IMG-Multimodal-Diffusion-Alignment/"
        "3b7abddb533e4e15edd519ae9318c6fb760ff478/assets/edit_instructions.json"
    )


def test_same_seed_same_question_and_seeds_vary():
    prompt = "a robot penguin wearing a top hat"
    source = load_question_source("ours")
    assert source.name == "ours" and len(source.templates) == 100
    assert source.pick(prompt, seed=7) == source.pick(prompt, seed=7) == pick_question(prompt, seed=7)
    questions = {source.pick(prompt, seed) for seed in range(200)}
    assert len(questions) >= 80  # 200 draws from 100 templates hit most of them
    assert all(prompt in question for question in questions)
    assert all(PLACEHOLDER not in question for question in questions)


def test_prompt_is_inserted_verbatim_even_with_braces():
    templates = ["Q1 {prompt}?", "Q2 {prompt}!"]
    question = pick_question("a {weird} prompt", seed=0, templates=templates)
    assert question in {"Q1 a {weird} prompt?", "Q2 a {weird} prompt!"}


@pytest.mark.parametrize(
    "template, prompt, expected",
    [
        ("Show {prompt}?", "a brown horse.", "Show a brown horse?"),
        ("Show {prompt}?", "a brown horse!", "Show a brown horse?"),
        ("Show {prompt}.", "a brown horse?", "Show a brown horse."),
        ("Was {prompt}, fixed?", "a brown horse...", "Was a brown horse, fixed?"),
        ("Show {prompt}?", "a brown horse", "Show a brown horse?"),
        ('Prompt "{prompt}"?', "a brown horse.", 'Prompt "a brown horse."?'),  # mark not right after
        ("Is {prompt} shown?", "a brown horse.", "Is a brown horse. shown?"),  # no mark after: kept
        ("Show {prompt}?", "  a horse.  ", "Show a horse?"),
    ],
)
def test_our_templates_do_not_double_punctuation(template, prompt, expected):
    assert fill_ours(template, prompt) == expected


def test_ours_never_doubles_marks_over_all_templates():
    source = load_question_source()
    for seed in range(300):
        question = source.pick("a brown horse.", seed)
        assert "horse.?" not in question and "horse.." not in question and "horse.," not in question


def test_file_source_fills_exactly_like_the_release(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(FAKE_RELEASE))
    source = load_question_source(str(path))
    assert source.templates == tuple(FAKE_RELEASE)  # duplicates kept: they weigh double, as in the release
    assert source.origin == str(path.resolve())
    prompt = " a brown horse. "
    questions = {source.pick(prompt, seed) for seed in range(50)}
    assert questions == {t.replace("{prompt}", prompt) for t in FAKE_RELEASE}  # no strip, no punctuation rule
    assert source.pick(prompt, 11) == source.pick(prompt, 11)


def test_release_reads_a_populated_cache_without_network(tmp_path, caplog):
    cache = release_questions_cache_path(tmp_path)
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps(FAKE_RELEASE))
    with caplog.at_level(logging.WARNING, logger="img_core.questions"):
        source = load_question_source("release", cache_dir=tmp_path, release_url=closed_port_url())
    assert source.name == "release" and source.templates == tuple(FAKE_RELEASE)
    assert source.origin == str(cache)
    assert caplog.records == []


def test_release_cache_follows_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("IMG_STUDIO_CACHE", str(tmp_path))
    assert release_questions_cache_path() == tmp_path / "questions" / "edit_instructions-3b7abdd.json"


def test_release_offline_and_uncached_falls_back_with_one_warning(tmp_path, caplog):
    url = closed_port_url()
    with caplog.at_level(logging.WARNING, logger="img_core.questions"):
        first = load_question_source("release", cache_dir=tmp_path, release_url=url)
        second = load_question_source("release", cache_dir=tmp_path, release_url=url)
    assert first.name == second.name == "ours" and len(first.templates) == 100
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert url in warnings[0] and "--questions FILE" in warnings[0]
    assert not release_questions_cache_path(tmp_path).exists()


def test_damaged_release_cache_is_an_error_not_silently_used(tmp_path):
    cache = release_questions_cache_path(tmp_path)
    cache.parent.mkdir(parents=True)
    cache.write_text('["no placeholder"]')
    with pytest.raises(InvalidInputError, match=f"(?s){cache.name}.*exactly once.*Delete"):
        load_question_source("release", cache_dir=tmp_path, release_url=closed_port_url())


class _OneFileHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_fetch_checks_the_hash_and_caches_once(tmp_path):
    body = json.dumps(FAKE_RELEASE).encode()
    _OneFileHandler.body, _OneFileHandler.requests = body, 0
    server = http.server.HTTPServer(("127.0.0.1", 0), _OneFileHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/edit_instructions.json"
    cache = release_questions_cache_path(tmp_path)
    try:
        with pytest.raises(OSError, match="sha256"):
            fetch_release_questions(cache, url, sha256="0" * 64, timeout_s=5)
        assert not cache.exists()
        assert fetch_release_questions(cache, url, sha256=hashlib.sha256(body).hexdigest(), timeout_s=5) == tuple(FAKE_RELEASE)
        assert cache.read_bytes() == body
        assert list(cache.parent.iterdir()) == [cache]  # no temporary file left behind
        requests = _OneFileHandler.requests
        source = load_question_source("release", cache_dir=tmp_path, release_url=url)
        assert source.templates == tuple(FAKE_RELEASE) and _OneFileHandler.requests == requests  # cache hit
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid UTF-8 JSON"),
        ('{"a": "{prompt}"}', "not a list"),
        ("[]", "empty list"),
        ('["ok {prompt}", 3]', r"entries \[1\] are not strings"),
        ('["ok {prompt}", "none here"]', r"entries \[1\].*exactly once"),
        ('["two {prompt} {prompt}"]', r"entries \[0\].*exactly once"),
    ],
)
def test_invalid_question_files_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=f"(?s)bad.json.*{problem}"):
        load_question_source(str(path))


def test_missing_question_file_lists_the_choices(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist.*ours, release"):
        load_question_source(str(tmp_path / "nope.json"))


@pytest.mark.parametrize(
    "templates, problem",
    [
        ([f"q{i} {{prompt}}" for i in range(99)], "expected 100"),
        (["same {prompt}"] * 2 + [f"q{i} {{prompt}}" for i in range(98)], "repeats"),
        (["two {prompt} {prompt}"] + [f"q{i} {{prompt}}" for i in range(99)], "exactly once"),
    ],
)
def test_invalid_template_files_are_rejected(tmp_path, templates, problem):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(templates))
    with pytest.raises(InvalidInputError, match=problem):
        load_question_templates(path)
