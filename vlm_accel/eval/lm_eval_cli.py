"""``vlm-accel eval``: lm-eval's own CLI with the ``vlm-accel`` model registered and the testbed tasks included.

lm-eval has no plugin discovery for models (hf_internals §6.2), so this wrapper imports the model module (which
registers ``vlm-accel``) and then runs lm-eval's CLI on every remaining argument, unchanged::

    vlm-accel eval --model vlm-accel \\
        --model_args pretrained=testbed-l,method=fastv,layer=2,keep_ratio=0.25 \\
        --tasks vlm_accel_testbed --limit 20 --batch_size 8 --device cpu --output_path runs/eval

    python -m vlm_accel.eval.lm_eval_cli ...                  # the same, without the vlm-accel entry point
    accelerate launch -m vlm_accel.eval.lm_eval_cli ...       # data parallel, as lm-eval documents it
    vlm-accel eval --num-processes 2 ...                      # the same launch done for you (CPU: torchrun + gloo)

The shipped testbed task YAMLs (``vlm_accel/testbed/tasks``) are added to the task search path; a user's own
``--include_path`` (or one set in a ``--config`` YAML) is kept alongside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HELP = "evaluate with lm-eval (all lm-eval options; model 'vlm-accel' registered, testbed tasks included)"
LM_EVAL_MISSING = (
    "vlm-accel eval needs lm-eval, which is not installed: pip install 'lm-eval>=0.4.13,<0.5' "
    "(or reinstall vlm-accel: pip install -e .)"
)


def testbed_tasks_dir() -> Path | None:
    """The packaged testbed task directory, or None while it does not exist (located without importing it)."""
    spec = importlib.util.find_spec("vlm_accel.testbed")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        tasks = Path(location) / "tasks"
        if tasks.is_dir():
            return tasks
    return None


def _include_paths(args: argparse.Namespace) -> list[str]:
    paths: list[str] = []
    tasks = testbed_tasks_dir()
    if tasks is not None:
        paths.append(str(tasks))
    config_path = getattr(args, "config", None)
    if config_path:
        from lm_eval.config.evaluate_config import EvaluatorConfig

        from_yaml = EvaluatorConfig.load_yaml_config(config_path).get("include_path")
        paths += from_yaml if isinstance(from_yaml, list) else [from_yaml] if from_yaml else []
    user = getattr(args, "include_path", None)
    paths += user if isinstance(user, list) else [user] if user else []
    return list(dict.fromkeys(paths))


class KnownNoise(logging.Filter):
    """Drops lm-eval warnings that are expected for this wrapper and say nothing about the run: the per-task
    "Custom kwargs can be passed to --metadata" notice of the shipped testbed tasks (one per task, five for the
    group) and "HF model type is neither marked as CausalLM or Seq2SeqLM" for the VLM this wrapper loads itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Custom kwargs can be passed to `--metadata`" in message and message.startswith("vlm_accel_testbed"):
            return False
        return "HF model type is neither marked as CausalLM or Seq2SeqLM" not in message


NOISY_LOGGERS = ("lm_eval.api.task", "lm_eval.models.huggingface")


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """:class:`KnownNoise` on lm-eval's loggers and :func:`quiet_git_hash`, for one run."""
    noise = KnownNoise()
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with quiet_git_hash():
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


@contextmanager
def quiet_git_hash() -> Iterator[None]:
    """lm-eval records ``git describe --always`` of the working directory in its results and lets git print
    ``fatal: not a git repository`` when there is none; run the same command with git's stderr captured."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash

    def git_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip() or None

    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_lm_eval(argv: Sequence[str]) -> int:
    """Register the ``vlm-accel`` model, then run lm-eval's CLI on ``argv``.

    This is ``lm_eval.__main__.cli_evaluate`` step by step (logging setup, ``HarnessCLI`` parse, execute), with one
    addition between parse and execute: ``include_path`` becomes the list [testbed tasks, the config's, the
    user's] — lm-eval's ``--include_path`` flag takes a single directory but its ``TaskManager`` accepts a list.
    """
    from vlm_accel.eval.distributed import launch, pop_num_processes

    try:
        num_processes, argv = pop_num_processes(argv)
    except ValueError as err:
        print(f"vlm-accel eval: {err}", file=sys.stderr)
        return 2
    if num_processes > 1:  # data parallel: relaunch in N processes (accelerate / torchrun), then lm-eval shards
        return launch(num_processes, argv)
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "lm_eval":
            from vlm_accel.cli import MissingExtra

            raise MissingExtra(LM_EVAL_MISSING) from None
        raise

    import vlm_accel.eval.lm_eval_model  # noqa: F401  (registers the model)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    saved_argv = sys.argv
    sys.argv = ["vlm-accel eval", *argv]
    try:
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        if getattr(args, "command", None) == "run":
            paths = _include_paths(args)
            if paths:
                args.include_path = paths if len(paths) > 1 else paths[0]
        with quiet_lm_eval():
            parser.execute(args)
    except SystemExit as exit_:  # argparse --help / errors
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_lm_eval(args.lm_eval_args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlm-accel eval``; every argument after ``eval`` (``-h`` included) goes to lm-eval."""
    parser = subparsers.add_parser(
        "eval",
        help=HELP,
        description=HELP + ". Run `vlm-accel eval -h` for lm-eval's options.",
        add_help=False,
        prefix_chars="\0",  # nothing is an option here: lm-eval parses everything
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    from vlm_accel.cli import MissingExtra

    try:
        return run_lm_eval(sys.argv[1:] if argv is None else argv)
    except MissingExtra as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
