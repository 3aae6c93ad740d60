"""Scorers on tiny random CLIP models and the tiny MLLMs, loaded through the same loaders as the real ids:
each number is checked against the metric's formula computed here from the same weights."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
REFERENCE_PACKAGES = REPO / ".reference-packages"  # make reference-packages (make test runs it)
PROMPTS = ["A red cup next to a blue plate.", "Three dogs running on a beach.", "A cat under a wooden table."]


def images(count: int = 3, size: tuple[int, int] = (64, 64)) -> list[Image.Image]:
    return [
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        for seed in range(count)
    ]


@pytest.fixture(scope="module")
def scorers_root(tiny_root):
    from img_core.tiny.scorers import ensure_tiny_scorers

    return ensure_tiny_scorers(tiny_root)


@pytest.fixture(scope="module")
def tiny_llava(tiny_root):
    from img_core.mllm import MLLMCritic, resolve_spec

    return MLLMCritic.load(resolve_spec("tiny-llava", tiny_root), device="cpu", quantization="none")


def clip_cosines(folder, processor_folder, pixel_values=None, pictures=None, prompts=PROMPTS):
    """cos(image, text) straight from CLIPModel.forward's normalised embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    from img_core.clip_processing import pil_clip_image_processor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(processor_folder)
    processor.image_processor = pil_clip_image_processor(processor.image_processor)
    if pixel_values is None:
        pixel_values = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixel_values)
    # logits_per_image = exp(logit_scale) * cos; its diagonal pairs image i with prompt i
    return output.logits_per_image.diagonal() / model.logit_scale.exp(), model.logit_scale.exp().item()


def test_open_clip_layout_round_trips_exactly(scorers_root):
    from img_core.evaluation.scorers import open_clip_to_transformers
    from img_core.tiny.scorers import tiny_clip_model, transformers_to_open_clip

    original = tiny_clip_model("gelu", seed=7).state_dict()
    open_clip = transformers_to_open_clip(original)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in open_clip
    assert open_clip["visual.proj"].shape == original["visual_projection.weight"].t().shape
    back = open_clip_to_transformers({f"module.{k}": v for k, v in open_clip.items()})  # DDP prefix too
    expected = {k: v for k, v in original.items() if "position_ids" not in k}
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize(("name", "weights_seed"), [("hpsv2", 2), ("hpsv2.0", 4)])
def test_hpsv2_loads_the_open_clip_checkpoint_and_scores_100_cos(scorers_root, tmp_path, name, weights_seed):
    from img_core.evaluation.scorers import hps_pixel_values, load_scorer
    from img_core.tiny.scorers import TINY_SCORER_IMAGE_SIZE, tiny_clip_model

    scorer = load_scorer(name, tiny_root=scorers_root.parent)
    pictures = images()
    scores = scorer.score(pictures, PROMPTS)
    # the same weights as a CLIPModel (the tiny HPS v2.1 file was written from seed 0 + 2, v2.0 from 0 + 4)
    folder = tmp_path / "reference-hps"
    tiny_clip_model("gelu", seed=weights_seed).save_pretrained(folder)
    mean, std = scorer.processor.image_processor.image_mean, scorer.processor.image_processor.image_std
    pixels = hps_pixel_values(pictures, TINY_SCORER_IMAGE_SIZE, mean, std)
    cosines, _ = clip_cosines(folder, scorers_root / "tiny-clip-h", pixel_values=pixels)
    assert scores == pytest.approx((100 * cosines).tolist(), abs=1e-4)
    assert len(set(round(s, 3) for s in scores)) == 3  # the tiny scorer tells images apart


def test_hps_preprocessing_resizes_longest_side_and_pads_black():
    from img_core.evaluation.scorers import hps_pixel_values

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    wide = Image.new("RGB", (64, 32), (255, 255, 255))
    pixels = hps_pixel_values([wide], 32, mean, std)  # 64x32 -> 32x16, padded 8 rows above and below
    assert pixels.shape == (1, 3, 32, 32)
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    white = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(3, 1, 1)
    assert torch.allclose(pixels[0, :, :8], black.expand(3, 8, 32), atol=1e-6)
    assert torch.allclose(pixels[0, :, 24:], black.expand(3, 8, 32), atol=1e-6)
    assert torch.allclose(pixels[0, :, 9:23], white.expand(3, 14, 32), atol=1e-3)


def test_pickscore_and_clipscore_follow_their_formulas(scorers_root):
    from img_core.evaluation.scorers import load_scorer

    pictures = images()
    pick = load_scorer("pickscore", tiny_root=scorers_root.parent).score(pictures, PROMPTS)
    cosines, logit_scale = clip_cosines(scorers_root / "tiny-pickscore", scorers_root / "tiny-clip-h", pictures=pictures)
    assert pick == pytest.approx((logit_scale * cosines).tolist(), abs=1e-4)

    clip = load_scorer("clipscore", tiny_root=scorers_root.parent)
    values = clip.score(pictures, PROMPTS)
    cosines, _ = clip_cosines(scorers_root / "tiny-clip-l", scorers_root / "tiny-clip-l", pictures=pictures)
    assert values == pytest.approx((100 * cosines.clamp(min=0)).tolist(), abs=1e-4)
    # batching changes nothing, and a scorer unloads and loads again on demand
    one_by_one = [clip.score([image], [prompt])[0] for image, prompt in zip(pictures, PROMPTS)]
    clip.unload()
    assert clip.model is None
    assert one_by_one == pytest.approx(values, abs=1e-4)
    assert clip.score(pictures, PROMPTS) == pytest.approx(values, abs=1e-5)

    # Hessel et al.'s CLIP-S: 2.5 * max(cos, 0) of ViT-B/32 with "A photo depicts " before the caption
    hessel = load_scorer("clipscore-hessel", tiny_root=scorers_root.parent).score(pictures, PROMPTS)
    cosines, _ = clip_cosines(scorers_root / "tiny-clip-b", scorers_root / "tiny-clip-b", pictures=pictures,
                              prompts=[f"A photo depicts {prompt}" for prompt in PROMPTS])
    assert hessel == pytest.approx((2.5 * cosines.clamp(min=0)).tolist(), abs=1e-5)


def test_hps_text_cleanup_follows_open_clip(scorers_root):
    from img_core.evaluation.scorers import hps_clean_text, load_scorer

    assert hps_clean_text("a dog\u2019s  \u201cbest\u201d friend &amp;amp; a \ufb01sh\n") == 'a dog\'s "best" friend & a fish'
    assert hps_clean_text("\uff21\uff22 tea") == "AB tea"  # full-width letters fold, as ftfy's fix_character_width
    # a curly apostrophe tokenizes as the straight one in HPS (12 of Parti's 1,632 prompts have one)
    scorer = load_scorer("hpsv2", tiny_root=scorers_root.parent)
    picture = images(1)
    assert scorer.score(picture, ["a dog\u2019s toy"]) == scorer.score(picture, ["a dog's toy"])


def test_the_converter_refuses_weights_it_does_not_know():
    from img_core.errors import InvalidInputError
    from img_core.evaluation.scorers import open_clip_to_transformers
    from img_core.tiny.scorers import tiny_clip_model, transformers_to_open_clip

    open_clip = transformers_to_open_clip(tiny_clip_model("gelu", seed=7).state_dict())
    open_clip["visual.attn_pool.query"] = torch.zeros(4, 32)  # a CoCa-style attention pooler: not our CLIP
    with pytest.raises(InvalidInputError, match=r"1 weights this conversion does not know \(visual.attn_pool.query\)"):
        open_clip_to_transformers(open_clip)


def reference_vqascore(critic, image, text) -> float:
    """VQAScore computed here from t2v_metrics' definition: the question
    'Does this figure show "{text}"? Please answer yes or no.', the answer "Yes" after it in the judge's chat
    template, and exp(mean log p) of the answer's tokens, each p a softmax over the FULL vocabulary of a
    plain forward pass."""
    question = f'Does this figure show "{text}"? Please answer yes or no.'
    prompt_ids = critic.encode_conversation(image, question)["input_ids"][0]
    inputs = critic.encode_conversation(image, question, "Yes")
    ids = inputs["input_ids"][0]
    assert torch.equal(ids[: len(prompt_ids)], prompt_ids)  # the answer follows the question unchanged
    count = 1
    while critic.tokenizer.decode(ids[len(prompt_ids) : len(prompt_ids) + count].tolist()).strip() != "Yes":
        count += 1
    with torch.no_grad():
        probabilities = critic.model(**inputs).logits[0].double().softmax(dim=-1)  # (S, V)
    product = 1.0
    for position in range(len(prompt_ids), len(prompt_ids) + count):
        product *= probabilities[position - 1, ids[position]].item()
    return product ** (1 / count)


@pytest.fixture(scope="module")
def tiny_qwen(tiny_root):
    from img_core.mllm import MLLMCritic, resolve_spec

    return MLLMCritic.load(resolve_spec("tiny-qwen", tiny_root), device="cpu", quantization="none")


def test_vqascore_equals_the_published_formula_computed_here(tiny_root, tiny_llava, tiny_qwen):
    from img_core.evaluation.scorers import VQA_QUESTION, load_scorer

    assert VQA_QUESTION.format(text="x") == 'Does this figure show "x"? Please answer yes or no.'
    pictures = images(2)
    for critic in (tiny_llava, tiny_qwen):
        scorer = load_scorer("vqascore:self", critic=critic)
        scores = scorer.score(pictures, PROMPTS[:2])
        expected = [reference_vqascore(critic, image, prompt) for image, prompt in zip(pictures, PROMPTS[:2])]
        assert scores == pytest.approx(expected, abs=1e-5)
        assert all(0.0 < s < 1.0 for s in scores)
        assert scorer.provenance()["judge"] == critic.spec.name and scorer.provenance()["self_judged"]

    # the first answer position of the teacher-forced pass is the next-token distribution after the question
    question = VQA_QUESTION.format(text=PROMPTS[0])
    with torch.no_grad():
        next_token = tiny_qwen.model(**tiny_qwen.encode_conversation(pictures[0], question)).logits[0, -1].softmax(-1)
    yes_first = tiny_qwen.tokenizer.encode("Yes", add_special_tokens=False)[0]
    full = tiny_qwen.encode_conversation(pictures[0], question, "Yes")
    with torch.no_grad():
        forced = tiny_qwen.model(**full).logits[0].softmax(-1)
    start = tiny_qwen.encode_conversation(pictures[0], question)["input_ids"].shape[1]
    assert full["input_ids"][0, start].item() == yes_first
    assert forced[start - 1, yes_first].item() == pytest.approx(next_token[yes_first].item(), abs=1e-5)


def test_default_judge_is_not_the_guidance_mllm(tiny_root, tiny_llava):
    from img_core.evaluation.scorers import default_judge, describe_scorer, load_scorer

    assert default_judge("tiny-llava", tiny_root) == "tiny-qwen"
    assert default_judge("tiny-qwen", tiny_root) == "tiny-llava"
    assert default_judge("img-llava-13b") is None  # HF_HUB_OFFLINE, nothing cached: no other judge is here
    scorer = load_scorer("vqascore", tiny_root=tiny_root, critic=tiny_llava)
    assert scorer.critic is None and scorer.judge == "tiny-qwen" and not scorer.self_judged  # loads its own judge
    assert describe_scorer("vqascore", "tiny-llava", tiny_root) == {
        "method": "vqascore", "question": 'Does this figure show "{text}"? Please answer yes or no.',
        "judge": "tiny-qwen", "self_judged": False}
    assert describe_scorer("vqascore:self", "tiny-llava", tiny_root)["self_judged"] is True
    assert describe_scorer("vqascore:tiny-llava", "tiny-llava", tiny_root)["self_judged"] is True
    # released presets offline with no other judge cached: the guidance MLLM judges itself, and says so
    assert describe_scorer("vqascore", "img-llava-13b")["self_judged"] is True


def test_vqascore_yesno_is_p_yes_over_yes_and_no(tiny_root, tiny_llava):
    from img_core.evaluation.scorers import (
        NO_WORDS,
        YES_WORDS,
        YESNO_QUESTION,
        answer_token_ids,
        load_scorer,
    )

    pictures = images(2)
    shared = load_scorer("vqascore-yesno:self", critic=tiny_llava)
    scores = shared.score(pictures, PROMPTS[:2])
    yes = sorted(answer_token_ids(tiny_llava.tokenizer, YES_WORDS))
    no = sorted(answer_token_ids(tiny_llava.tokenizer, NO_WORDS))
    assert {tiny_llava.tokenizer.decode([i]).strip()[0] for i in yes} == {"Y", "y"}
    assert {tiny_llava.tokenizer.decode([i]).strip()[0] for i in no} == {"N", "n"}
    expected = []
    for image, prompt in zip(pictures, PROMPTS[:2]):
        inputs = tiny_llava.encode_conversation(image, YESNO_QUESTION.format(prompt=prompt), None)
        with torch.no_grad():
            p = tiny_llava.model(**inputs).logits[0, -1].softmax(-1)
        expected.append((p[yes].sum() / (p[yes].sum() + p[no].sum())).item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in scores)
    # a separately named judge loads its own copy of the same weights: the same numbers
    judge = load_scorer("vqascore-yesno:tiny-llava", tiny_root=tiny_root)
    assert judge.score(pictures, PROMPTS[:2]) == pytest.approx(scores, abs=1e-5)
    assert judge.self_judged is False  # no guidance MLLM named: nothing to be self-judged against
    judge.unload()
    assert judge.critic is None
    shared.unload()
    assert shared.critic is tiny_llava  # the session's MLLM is not the scorer's to free


def test_bad_input_and_missing_weights_are_user_errors(scorers_root):
    from img_core.errors import InvalidInputError, WeightsNotFoundError
    from img_core.evaluation.scorers import (
        CLIP_SCORERS,
        CLIPScorer,
        NonFiniteScoreError,
        _checked_scores,
        check_scorer_names,
        load_scorer,
    )

    with pytest.raises(InvalidInputError, match="unknown scorer 'hps'"):
        check_scorer_names(["hps"])
    with pytest.raises(InvalidInputError, match="named twice"):
        check_scorer_names(["hpsv2", "hpsv2"])
    with pytest.raises(InvalidInputError, match="judges with the session's MLLM"):
        load_scorer("vqascore:self")
    scorer = load_scorer("clipscore", tiny_root=scorers_root.parent)
    with pytest.raises(InvalidInputError, match="one prompt per image"):
        scorer.score(images(2), PROMPTS)
    with pytest.raises(InvalidInputError, match="non-empty prompt"):
        scorer.score(images(1), ["  "])
    with pytest.raises(NonFiniteScoreError, match="non-finite"):
        _checked_scores("hpsv2", torch.tensor([1.0, float("nan")]))
    with pytest.raises(WeightsNotFoundError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):  # HF_HUB_OFFLINE=1
        CLIPScorer(CLIP_SCORERS["hpsv2"]).score(images(1), PROMPTS[:1])


@pytest.mark.skipif(not (REFERENCE_PACKAGES / "open_clip").is_dir(),
                    reason="open_clip is not in .reference-packages: run make reference-packages")
def test_conversion_and_text_cleanup_match_open_clip_itself():
    """open_clip itself (tests/reference/open_clip_checks.py, in a subprocess with .reference-packages on its
    path): a random open_clip ViT CLIP and its converted CLIPModel give the same embeddings, and our HPS text
    cleanup equals open_clip's (ftfy included) on curly quotes, entities, ligatures, width and whitespace."""
    import json

    checks = json.loads(run_reference("open_clip_checks.py"))
    assert checks["image_max_diff"] < 1e-5 and checks["text_max_diff"] < 1e-5, checks
    assert checks["prompts"] == 6 and checks["cleanup_mismatches"] == [], checks


def run_reference(script: str, *args: str) -> str:
    """The last line printed by tests/reference/`script`, run with the reference packages on its path."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{REFERENCE_PACKAGES}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "reference" / script), *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ ImageReward

LONG_PROMPT = ("A very long prompt about a lighthouse on a cliff at dusk, with waves, gulls, a red boat, three "
               "fishermen, nets, a dog, lanterns and a full moon rising over the distant hills")  # > 35 tokens


def imagereward_cases(folder: Path) -> list[dict]:
    """Images of several sizes and modes (the release resizes, crops and only then converts to RGB)."""
    rng = np.random.default_rng(11)
    pictures = {
        "wide.png": Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)),
        "tall-rgba.png": Image.fromarray(rng.integers(0, 255, (90, 50, 4), dtype=np.uint8), mode="RGBA"),
        "gray.png": Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L"),
        "large.png": Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)),
        "flat.png": Image.new("RGB", (32, 32), (200, 30, 30)),
    }
    for name, picture in pictures.items():
        picture.save(folder / name)
    prompts = ["A red cat on the mat.", "TWO BLUE DOGS, running!", LONG_PROMPT, "a cat", "it's 3 o'clock"]
    return [{"image": str(folder / name), "prompt": prompt} for name, prompt in zip(pictures, prompts)]


@pytest.mark.skipif(not (REFERENCE_PACKAGES / "ImageReward" / "ImageReward.py").is_file(),
                    reason="the image-reward package is not in .reference-packages: run make reference-packages")
def test_imagereward_equals_the_released_package_on_tiny_weights(scorers_root, tmp_path):
    """The package's own ImageReward.score (tests/reference/imagereward_release.py, in a subprocess with the
    package on its path) and our port on the same tiny checkpoint, tokenizer and images."""
    import json

    from img_core.evaluation.scorers import load_scorer

    cases = imagereward_cases(tmp_path)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    expected = json.loads(run_reference("imagereward_release.py", str(scorers_root), str(tmp_path / "cases.json")))

    scorer = load_scorer("imagereward", tiny_root=scorers_root.parent)
    ours = scorer.score([Image.open(case["image"]) for case in cases], [case["prompt"] for case in cases])
    assert len(ours) == len(expected) == 5
    assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-5, (ours, expected)
    assert max(expected) - min(expected) > 0.1  # the cases score differently: the comparison can fail
    one_by_one = [scorer.score([Image.open(case["image"])], [case["prompt"]])[0] for case in cases]
    assert max(abs(a - b) for a, b in zip(ours, one_by_one)) < 1e-5  # batching changes nothing


def test_imagereward_checkpoint_converts_both_ways_and_refuses_what_it_does_not_know():
    from img_core.errors import InvalidInputError
    from img_core.evaluation.imagereward import convert_imagereward_checkpoint
    from img_core.tiny.scorers import imagereward_to_release, tiny_imagereward_model

    model = tiny_imagereward_model(vocab_size=91, seed=3)
    release = imagereward_to_release(model.state_dict())
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in release and "mlp.layers.7.bias" in release
    assert release["blip.visual_encoder.pos_embed"].shape == (1, 17, 32)  # 1 + (32 / 8) ** 2 tokens
    release["blip.text_proj.weight"] = torch.zeros(16, 32)  # saved by BLIP, unused by the score: skipped
    back = convert_imagereward_checkpoint({f"module.{key}": value for key, value in release.items()})
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in model.state_dict().items())
    release["blip.itm_head.weight"] = torch.zeros(2, 32)
    with pytest.raises(InvalidInputError, match="1 weights this conversion does not know \\(blip.itm_head.weight\\)"):
        convert_imagereward_checkpoint(release)


def test_imagereward_errors_are_user_errors(scorers_root, tmp_path):
    import dataclasses
    import shutil

    from img_core.errors import InvalidInputError, WeightsNotFoundError
    from img_core.evaluation.imagereward import IMAGEREWARD
    from img_core.evaluation.scorers import (
        ImageRewardScorer,
        NonFiniteScoreError,
        check_scorer_names,
        describe_scorer,
        load_scorer,
    )
    from img_core.tiny.scorers import TINY_SCORER_FOLDERS, tiny_imagereward_overrides

    assert check_scorer_names([" imagereward "]) == ["imagereward"]
    assert describe_scorer("imagereward", None) == {"weights": "THUDM/ImageReward/ImageReward.pt", "tiny": False}
    with pytest.raises(WeightsNotFoundError, match="THUDM/ImageReward"):  # HF_HUB_OFFLINE=1, nothing cached
        ImageRewardScorer(IMAGEREWARD).score(images(1), PROMPTS[:1])
    scorer = load_scorer("imagereward", tiny_root=scorers_root.parent)
    with pytest.raises(InvalidInputError, match="one prompt per image"):
        scorer.score(images(2), PROMPTS)

    broken = tmp_path / "broken"  # a damaged download: NaN weights are caught, nothing is returned
    shutil.copytree(scorers_root / TINY_SCORER_FOLDERS["imagereward"], broken)
    weights = torch.load(broken / "ImageReward.pt")
    weights["mlp.layers.7.bias"] = torch.tensor([float("nan")])
    torch.save(weights, broken / "ImageReward.pt")
    spec = dataclasses.replace(IMAGEREWARD, **{**tiny_imagereward_overrides(scorers_root), "repo": str(broken)})
    with pytest.raises(NonFiniteScoreError, match="imagereward produced non-finite"):
        ImageRewardScorer(spec).score(images(1), PROMPTS[:1])
    (broken / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInputError, match="is not a readable torch checkpoint"):
        ImageRewardScorer(spec).score(images(1), PROMPTS[:1])
    wrong_size = dataclasses.replace(spec, repo=str(scorers_root / TINY_SCORER_FOLDERS["imagereward"]),
                                     vision={**spec.vision, "hidden_size": 64})
    with pytest.raises(InvalidInputError, match="does not fit ImageReward's architecture"):
        ImageRewardScorer(wrong_size).score(images(1), PROMPTS[:1])
