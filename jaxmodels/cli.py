"""`jaxmodels generate | batch | convert | plan | train | export`: one entry point, each subcommand in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "generate": ("jaxmodels.generate_cli", "generate text from a checkpoint"),
    "batch": ("jaxmodels.batch_cli", "JSONL requests in, JSONL completions out (continuous batching)"),
    "convert": ("jaxmodels.convert.cli", "check/convert a Hugging Face checkpoint (load, then export)"),
    "plan": ("jaxmodels.plan", "bytes per device of a model on a mesh, from shapes only"),
    "train": ("jaxmodels.train.cli", "fine-tune a checkpoint (full or LoRA) on a JSONL file"),
    "export": ("jaxmodels.train.export", "write a training run back as a Hugging Face checkpoint / PEFT adapter"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxmodels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        modules[name].add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
