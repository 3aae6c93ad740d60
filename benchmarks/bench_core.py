"""img_core benchmark: prints figures, asserts nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_core.py [--rounds 3] [--skip-tiny]

1. Tiny presets on CPU: seconds per stage of an IMG round, and the aligner's share of the round.
2. Real-size aligners (SDXL and FLUX dims, random weights): parameters and CPU forward time of the
   3-pass alignment with a LLaVA-sized guidance sequence.
3. Peak GPU memory estimate per real preset and MLLM quantization, from parameter counts of the real
   architectures built on the meta device (configs in real_architectures.py, from the public model cards),
   against a 24 GB budget. Weights only plus a fixed activation allowance: an estimate, not a measure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # real_architectures

GIB = 1024**3
BUDGET_GIB = 24.0
# bytes per parameter for the quantized linear layers (nf4 stores 4-bit weights + one fp32 absmax per 64)
BYTES_PER_PARAM = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
# allowances for activations, CUDA context and the attention workspace at 1024x1024 (rough, documented)
ACTIVATION_GIB = {"sdxl": 3.0, "flux": 4.0, "mllm": 1.0}


def bench_tiny(rounds: int) -> None:
    from img_core.session import IMGSession, RoundSettings

    print("== 1. tiny presets on CPU (seconds per stage, median over rounds) ==")
    for preset in ("tiny-sdxl", "tiny-flux"):
        session = IMGSession.from_preset(preset, device="cpu", show_progress_bars=False)
        start = time.perf_counter()
        session.load()
        load_seconds = time.perf_counter() - start
        record = session.run("A green banana and a brown horse.", seed=0, rounds=rounds, settings=RoundSettings())
        stages = {}
        for r in record.rounds[1:]:
            for stage, seconds in r.seconds.items():
                stages.setdefault(stage, []).append(seconds)
        medians = {stage: statistics.median(values) for stage, values in stages.items()}
        total = sum(medians.values())
        print(f"{preset}: load {load_seconds:.2f} s, first image {record.rounds[0].seconds['generate']:.3f} s, "
              f"steps {record.rounds[0].settings['steps']}")
        for stage, value in medians.items():
            print(f"  {stage:15s} {value:8.3f} s  {100 * value / total:5.1f} %")
        print(f"  {'round total':15s} {total:8.3f} s  (aligner share {100 * medians['align'] / total:.2f} %)")


def bench_round_path(rounds: int) -> None:
    """What the one round path saves: forward passes and seconds of `rounds` question-mode rounds, against the
    same rounds computed the earlier way (critique and guidance as two MLLM passes, the prompt re-encoded and
    the base image's IP features recomputed every round)."""
    import torch

    from img_core.backends.base import DiffusionCall
    from img_core.session import IMGSession, RoundSettings

    print("\n== the round path's savings (tiny-sdxl, question mode, after round 0; seconds per round) ==")
    session = IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False).load()
    pipeline, critic = session.backend.pipeline, session.critic
    counted = {"text encoders": [pipeline.text_encoder, pipeline.text_encoder_2],
               "MLLM vision tower": [critic.model.model.vision_tower], "IP image encoder": [pipeline.image_encoder]}
    calls = dict.fromkeys(counted, 0)

    def counter(name):
        def hook(*_):
            calls[name] += 1
        return hook

    for name, modules in counted.items():
        for module in modules:
            module.register_forward_hook(counter(name))
    prompt, settings = "A green banana and a brown horse.", RoundSettings()
    values = settings.resolve(session.base_preset)

    def earlier_way(first) -> None:
        base = first
        for index in range(1, rounds + 1):
            session.critic.critique(base.image, prompt, seed=0)  # a second MLLM pass just for the text
            guidance = session.critic.guidance(base.image, prompt, seed=0)
            features = session.backend.image_features(base.image)
            session.backend._prompt_embeddings.clear()  # re-encode the prompt every round
            aligned = session.aligner.align(features, guidance, passes=values.aligner_passes).float()
            call = DiffusionCall(prompt, 0, values.steps, values.guidance_scale, values.width, values.height, values.ip_scale)
            image = session.backend.regenerate(call, aligned)
            base = type(first)(index, image, prompt, 0, "refined")

    def round_path(first) -> None:
        base = first
        for index in range(1, rounds + 1):
            base = session.refine(base, prompt, 0, settings=settings, index=index)

    for label, run in (("round path", round_path), ("earlier way", earlier_way)):
        first = session.generate(prompt, 0, settings)
        for name in calls:
            calls[name] = 0
        start = time.perf_counter()
        with torch.no_grad():
            run(first)
        seconds = (time.perf_counter() - start) / rounds
        counts = ", ".join(f"{name} {count}" for name, count in calls.items())
        print(f"  {label:12s} {seconds:.3f} s per round; over {rounds} rounds: {counts}")


def bench_real_aligners() -> None:
    from img_core.aligner import FLUX_FEATURES, AlignerConfig, ImplicitAligner

    print("\n== 2. real-size aligners on CPU (float32, random weights, batch 1, 3 passes) ==")
    guidance_tokens = 576 + 40  # LLaVA-1.5: 576 image tokens + system text and question
    for name, dim, tokens, kind in (("SDXL", 2048, 16, None), ("FLUX", 4096, 4, FLUX_FEATURES)):
        config = AlignerConfig(image_dim=dim, guidance_dim=5120, num_image_tokens=tokens)
        if kind:
            config.image_feature_kind = kind
        aligner = ImplicitAligner(config).eval()
        parameters = sum(p.numel() for p in aligner.parameters())
        image_features, guidance = torch.randn(1, tokens, dim), torch.randn(1, guidance_tokens, 5120)
        with torch.no_grad():
            aligner.align(image_features, guidance)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                aligner.align(image_features, guidance, passes=3)
                times.append(time.perf_counter() - start)
        print(f"{name}: {parameters / 1e6:.1f} M parameters ({parameters * 4 / GIB:.2f} GiB fp32), "
              f"3-pass align {statistics.median(times) * 1000:.0f} ms on {torch.get_num_threads()} CPU threads")
        del aligner


def _linear_share(build) -> tuple[int, int]:
    """(parameters in nn.Linear weights, all parameters) of the language model: what quantization shrinks."""
    with torch.device("meta"):
        model = build()
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name and "vision" not in name
                 and "visual" not in name and "projector" not in name and "merger" not in name)
    return linear, sum(p.numel() for p in model.parameters())


def real_component_counts() -> dict[str, int | tuple[int, int]]:
    """Parameters of each real component, from the configs in benchmarks/real_architectures.py."""
    import real_architectures as real
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
        LlavaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        T5EncoderModel,
    )

    count = real.parameter_count
    counts: dict[str, int | tuple[int, int]] = {}
    counts["sdxl_unet"] = count(real.sdxl_unet)
    counts["sdxl_vae"] = count(real.sdxl_vae)
    counts["clip_l_text"] = count(lambda: CLIPTextModel(real.clip_l_text_config()))
    counts["clip_bigg_text"] = count(lambda: CLIPTextModelWithProjection(real.clip_bigg_text_config()))
    counts["clip_vit_h"] = count(lambda: CLIPVisionModelWithProjection(real.clip_vit_h_config()))
    counts["clip_vit_l"] = count(lambda: CLIPVisionModelWithProjection(real.clip_vit_l_config()))
    counts["flux_transformer"] = count(real.flux_transformer)
    counts["flux_vae"] = count(real.flux_vae)
    counts["t5_xxl"] = count(lambda: T5EncoderModel(real.t5_xxl_config()))
    counts["llava_13b"] = _linear_share(lambda: LlavaForConditionalGeneration(real.llava_13b_config()))
    counts["qwen25_vl_7b"] = _linear_share(lambda: Qwen2_5_VLForConditionalGeneration(real.qwen25_vl_7b_config()))
    return counts


def bench_memory_estimates() -> None:
    print("\n== 3. peak GPU memory estimate per preset and quantization (GiB; budget 24) ==")
    counts = real_component_counts()
    for name, value in counts.items():
        total = value[1] if isinstance(value, tuple) else value
        print(f"  {name:18s} {total / 1e9:6.2f} B parameters")
    # IP-Adapter parts: SDXL plus resampler (~0.1 B incl. to_k_ip/to_v_ip), XLabs projection + double-block k/v.
    sdxl_ip = 16 * 1280 + 4 * 12 * 1280 * 1280 + 1280 * (1280 + 2048) + 70 * 2 * 2048 * 1280
    flux_ip = 768 * 4 * 4096 + 19 * 2 * 3072 * 4096
    diffusion = {  # component -> (parameters, quantizable by --diffusion-quantization)
        "sdxl": {"unet": (counts["sdxl_unet"], True), "vae": (counts["sdxl_vae"], False),
                 "text encoders": (counts["clip_l_text"] + counts["clip_bigg_text"], False),
                 "image encoder + IP": (counts["clip_vit_h"] + sdxl_ip, False)},
        "flux-dev": {"transformer": (counts["flux_transformer"] + flux_ip, True), "vae": (counts["flux_vae"], False),
                     "T5-XXL": (counts["t5_xxl"], True), "CLIP-L text": (counts["clip_l_text"], False),
                     "image encoder": (counts["clip_vit_l"], False)},
    }
    aligner = {"sdxl": 195e6, "flux-dev": 675e6}
    mllms = {"img-llava-13b": counts["llava_13b"], "qwen2.5-vl-7b": counts["qwen25_vl_7b"]}
    print(f"\n  {'preset':9s} {'diff. quant':11s} {'MLLM':14s} {'MLLM quant':10s} {'diffusion':>9s} {'MLLM':>5s} "
          f"{'aligner':>7s} {'activ.':>6s} {'resident':>8s} {'--offload':>9s}  fits 24 GB")
    for preset, components in diffusion.items():
        family = "flux" if preset.startswith("flux") else "sdxl"
        for diffusion_quant in ("bf16", "nf4"):
            sizes = {name: params * (BYTES_PER_PARAM[diffusion_quant] if quantizable else 2.0) / GIB
                     for name, (params, quantizable) in components.items()}
            for mllm_name, (linear, total) in mllms.items():
                for quant in ("bf16", "int8", "nf4"):
                    mllm_gib = (linear * BYTES_PER_PARAM[quant] + (total - linear) * 2) / GIB
                    fixed = mllm_gib + aligner[preset] * 4 / GIB + ACTIVATION_GIB[family] + ACTIVATION_GIB["mllm"]
                    resident = fixed + sum(sizes.values())
                    offloaded = fixed + max(sizes.values())  # model CPU offload: one component on the GPU at a time
                    verdict = "yes" if resident <= BUDGET_GIB else "with --offload" if offloaded <= BUDGET_GIB else "no"
                    print(f"  {preset:9s} {diffusion_quant:11s} {mllm_name:14s} {quant:10s} {sum(sizes.values()):9.1f} "
                          f"{mllm_gib:5.1f} {aligner[preset] * 4 / GIB:7.1f} "
                          f"{ACTIVATION_GIB[family] + ACTIVATION_GIB['mllm']:6.1f} {resident:8.1f} {offloaded:9.1f}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args()
    from img_core.logs import quiet_library_output

    quiet_library_output()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.skip_tiny:
        bench_tiny(args.rounds)
    bench_round_path(rounds=3)
    bench_real_aligners()
    bench_memory_estimates()


if __name__ == "__main__":
    main()
