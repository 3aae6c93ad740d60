"""Measuring alignment at benchmark scale.

  * `prompt_sets` - prompt files and hub datasets -> prompts (and categories)
  * `scorers`     - HPS v2.1, PickScore, CLIPScore, VQAScore on PIL images
  * `evaluate`    - the evaluate loop: generate, refine, score, summarise, report (resumable)
"""
