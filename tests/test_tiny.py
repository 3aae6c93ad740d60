"""The tiny offline stack: deterministic, complete, and built once."""

import hashlib

from safetensors.torch import load_file

from img_core.tiny.diffusion import build_clip_tokenizer, build_tiny_sdxl
from img_core.tiny.models import TINY_VERSION, ensure_tiny_models


def digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    build_tiny_sdxl(tmp_path / "a", seed=0)
    build_tiny_sdxl(tmp_path / "b", seed=0)
    build_tiny_sdxl(tmp_path / "c", seed=1)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert len(a) >= 6 and a == b
    assert all(a[name] != c[name] for name in a)
    ip_adapter = load_file(str(tmp_path / "a" / "tiny-ip-adapter" / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"))
    assert ip_adapter["image_proj.latents"].shape == (1, 16, 32)
    assert sum(k.startswith("ip_adapter.") for k in ip_adapter) == 2 * 4  # to_k_ip/to_v_ip of 4 cross-attentions


def test_ensure_returns_the_built_folder_and_accepts_it_back(tiny_root):
    assert tiny_root.name == TINY_VERSION and (tiny_root / "COMPLETE").is_file()
    expected = {"tiny-sdxl", "tiny-sdxl-dpo-unet", "tiny-ip-adapter", "tiny-flux", "tiny-flux-ip-adapter",
                "tiny-clip-vit", "tiny-llava", "tiny-qwen", "tiny-aligner-sdxl", "tiny-aligner-flux"}
    assert expected <= {p.name for p in tiny_root.iterdir()}
    assert ensure_tiny_models(tiny_root.parent) == tiny_root
    assert ensure_tiny_models(tiny_root) == tiny_root  # a loaded session's tiny_root passed back in
    assert not (tiny_root / TINY_VERSION).exists()


def test_tiny_clip_tokenizer_has_whole_word_merges():
    tokenizer = build_clip_tokenizer()
    ids = tokenizer("A green banana and a brown horse.").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + 8  # seven words + the full stop, each one token
