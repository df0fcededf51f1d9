"""vlm-accel: one-line inference acceleration and hallucination mitigation for Hugging Face VLMs.

Start with ``vlm-accel compare`` (every method on the bundled testbed model, a few minutes on CPU).

Each sub-command lives in the subpackage that owns it and exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code). Only the
module of the sub-command being run is imported, so ``vlm-accel --help`` does not load torch, and optional extras
(lm-eval, gradio) are imported only by the commands that need them. Errors a user can fix (bad arguments, a method
that does not apply, a missing extra) print one line; ``--traceback`` (or ``VLM_ACCEL_TRACEBACK=1``) shows the
full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (command, module defining ``register(subparsers)``, one-line help for ``vlm-accel --help``)
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("compare", "vlm_accel.eval.compare", "every method on the bundled testbed model: accuracy x speed table, plot"),
    ("testbed", "vlm_accel.testbed.cli", "procedural visual-QA testbed: train, evaluate, validate models"),
    ("bench", "vlm_accel.eval.bench", "speed: unpatched vs patched (prefill, decode, end to end, memory, KV, FLOPs)"),
    ("eval", "vlm_accel.eval.lm_eval_cli", "evaluate with lm-eval (model 'vlm-accel' registered, testbed tasks)"),
    ("train", "vlm_accel.train.cli", "train the trained parts of a method (DyVTE routers, MoH routers)"),
    ("demo", "vlm_accel.demo.cli", "the Gradio demo: unpatched vs patched side by side (needs the demo extra)"),
)

#: Exceptions that describe a problem with the user's input or environment, printed as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, NotImplementedError)


class MissingExtra(RuntimeError):
    """An optional dependency a sub-command needs is not installed (the message names the pip extra)."""


def _requested_command(argv: list[str]) -> str | None:
    """The sub-command name in ``argv`` (the first positional argument), without parsing the rest."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``vlm-accel`` parser; only the sub-command named in ``argv`` gets its full parser (and its imports)."""
    parser = argparse.ArgumentParser(
        prog="vlm-accel", description=" ".join(__doc__.split("\n\n")[:2]),
        epilog="Run `vlm-accel COMMAND -h` for a command's options.",
    )  # fmt: skip
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _requested_command(argv if argv is not None else sys.argv[1:])
    for name, module_name, help_text in SUBCOMMANDS:
        if name != wanted:
            subparsers.add_parser(name, help=help_text, add_help=False)  # listed in --help, never run
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == module_name or module_name.startswith(err.name + ".")):
                continue  # a sub-command whose module is not part of this install
            raise
        module.register(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (MissingExtra, ModuleNotFoundError)) else f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from vlm_accel.errors import MethodNotApplicable

    try:
        return int(args.func(args) or 0)
    except (*USER_ERRORS, MethodNotApplicable, MissingExtra, ModuleNotFoundError) as err:
        if args.traceback or os.environ.get("VLM_ACCEL_TRACEBACK"):
            raise
        if isinstance(err, ModuleNotFoundError):
            err = MissingExtra(f"missing Python package {err.name!r} ({err}); reinstall vlm-accel with its "
                               "dependencies: pip install -e .")  # fmt: skip
        print(f"vlm-accel {args.command}: error: {_one_line(err)} (--traceback for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
