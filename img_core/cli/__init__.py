"""Command-line code, one module per command group (as diffusers keeps its `commands/`):

  * `parser`        - `OneLineErrorParser` and the exit codes every command shares
  * `main`          - `python -m img_core` dispatch, `refine`, `convert-aligner`
  * `evaluate`      - `evaluate`, `evaluate-compare`
  * `prepare`       - `prepare`
  * `convert_llava` - `convert-llava`

The library never imports this package; commands only parse flags and call the library.
"""
