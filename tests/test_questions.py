"""Question templates: 100 unique paraphrases with one {prompt}, chosen deterministically per seed."""

import json

import pytest

from img_core.questions import PLACEHOLDER, load_question_templates, pick_question


def test_templates_are_100_unique_with_one_placeholder():
    templates = load_question_templates()
    assert len(templates) == 100
    assert len(set(templates)) == 100
    assert all(template.count(PLACEHOLDER) == 1 for template in templates)
    assert all(template.strip().endswith(("?", ".")) for template in templates)


def test_same_seed_same_question_and_seeds_vary():
    prompt = "a robot penguin wearing a top hat"
    assert pick_question(prompt, seed=7) == pick_question(prompt, seed=7)
    questions = {pick_question(prompt, seed) for seed in range(200)}
    assert len(questions) >= 80  # 200 draws from 100 templates hit most of them
    assert all(prompt in question for question in questions)
    assert all(PLACEHOLDER not in question for question in questions)


def test_prompt_is_inserted_verbatim_even_with_braces():
    templates = ["Q1 {prompt}?", "Q2 {prompt}!"]
    question = pick_question("a {weird} prompt", seed=0, templates=templates)
    assert question in {"Q1 a {weird} prompt?", "Q2 a {weird} prompt!"}


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
    with pytest.raises(ValueError, match=problem):
        load_question_templates(path)
