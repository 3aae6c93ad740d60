"""First-run set-up: getting the weights a preset needs onto this machine.

  * `prepare`       - fetch only the needed files of `shi-labs/IMG` (and the hub models), convert once into the cache
  * `convert_llava` - the release's original-layout LLaVA folder -> a transformers LlavaForConditionalGeneration folder

The format of a converted folder (partial folder, journal, completion marker) lives in `img_core.mllm.converted`.
"""
