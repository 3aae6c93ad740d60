"""Offline stand-ins: tiny random-weight models built from configs and saved with `save_pretrained`, then
loaded through exactly the loaders the real hub ids use (tests, CI, the CPU preset of `make run`).

  * `models`    - `ensure_tiny_models(root)`: every tiny model a preset needs, built once, atomically
  * `diffusion` - tiny SDXL / FLUX pipelines with their IP-Adapters and image encoders
  * `mllm`      - tiny LLaVA and Qwen2.5-VL
  * `scorers`   - tiny CLIP scorers (HPS v2.1, PickScore, CLIPScore) in their hub layouts
"""
