"""`python -m trainer extract|train|finetune-mllm ...`: the same as `python -m trainer.<module> ...`."""

import sys

COMMANDS = {"extract": "trainer.extract", "train": "trainer.train", "finetune-mllm": "trainer.finetune_mllm"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m trainer {{{'|'.join(COMMANDS)}}} [--help | flags]")
    import importlib

    importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
