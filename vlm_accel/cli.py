"""The ``vlm-accel`` command.

Each sub-command lives in the subpackage that owns it and exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code). Sub-command
modules are imported lazily so ``vlm-accel --help`` stays fast and optional extras (lm-eval, gradio) are only
imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) — each module defines ``register(subparsers)``.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "vlm_accel.eval.compare",
    "vlm_accel.testbed.cli",
    "vlm_accel.eval.bench",
    "vlm_accel.eval.lm_eval_cli",
    "vlm_accel.train.cli",
    "vlm_accel.demo.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-accel", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # A sub-command whose module is not present yet (or whose optional extra is missing) is simply absent.
            if err.name and (err.name == module_name or module_name.startswith(err.name + ".")):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
