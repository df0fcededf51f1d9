"""The ``vlm-accel`` entry point: help without heavy imports, one-line errors, the lm-eval guard and noise filter,
the lazy package namespace, and the skip summary's grouping (tests/conftest.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_accel.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    return done.stdout


def test_top_level_help_lists_every_command_without_importing_torch():
    out = _python(
        "import sys\nfrom vlm_accel.cli import build_parser\n"
        "print(build_parser(['--help']).format_help())\nprint('torch loaded:', 'torch' in sys.modules)"
    )
    assert "torch loaded: False" in out
    for name, _, help_text in SUBCOMMANDS:
        assert f"    {name} " in out and help_text.split()[0] in out
    assert "The ``vlm-accel`` command" not in out


def test_import_vlm_accel_is_lazy_and_exports_resolve():
    assert "torch loaded: False" in _python("import sys, vlm_accel\nprint('torch loaded:', 'torch' in sys.modules)")
    import vlm_accel

    assert set(vlm_accel.__all__) == set(vlm_accel._EXPORTS)
    for name in vlm_accel.__all__:
        assert getattr(vlm_accel, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vlm_accel.nope  # noqa: B018


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["compare", "--methods", "nope"], "unknown method 'nope'"),
        (["bench", "--analytic", "--method", "fastv:keep_ratio=2"], "keep_ratio"),
        (["bench", "--analytic", "--method", "fastv:nope=1"], "nope"),
    ],
)
def test_user_errors_print_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert err.startswith(f"vlm-accel {argv[0]}: error: ")


def test_traceback_flag_reraises():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        main(["--traceback", "compare", "--methods", "nope"])


def test_eval_without_lm_eval_names_the_install(monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")] or ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lm_eval...` raise ModuleNotFoundError
    assert main(["eval", "--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lm-eval" in err


def test_lm_eval_known_noise_is_filtered_and_the_rest_kept():
    from vlm_accel.eval.lm_eval_cli import KnownNoise

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("lm_eval.api.task", logging.WARNING, __file__, 1, message, None, None)

    noise = KnownNoise()
    assert not noise.filter(record("vlm_accel_testbed_color: Custom kwargs can be passed to `--metadata` ..."))
    assert not noise.filter(record("HF model type is neither marked as CausalLM or Seq2SeqLM. ..."))
    assert noise.filter(record("other_task: Custom kwargs can be passed to `--metadata` ..."))
    assert noise.filter(record("--limit SHOULD ONLY BE USED FOR TESTING."))


def test_git_hash_outside_a_repository_is_quiet(tmp_path, monkeypatch, capfd):
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator as evaluator

    from vlm_accel.eval.lm_eval_cli import quiet_git_hash

    original = evaluator.get_git_commit_hash
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with quiet_git_hash():
        assert evaluator.get_git_commit_hash() is None
    assert evaluator.get_git_commit_hash is original
    assert "fatal" not in capfd.readouterr().err


def test_skip_summary_groups_by_reason_head():
    from conftest import skip_group, skip_reason

    class Report:
        longrepr = ("tests/x.py", 3, "Skipped: paint does not apply to qwen2_vl: no CLS token")

    assert skip_reason(Report()) == "paint does not apply to qwen2_vl: no CLS token"
    assert skip_group(skip_reason(Report())) == "paint does not apply to qwen2_vl"
    assert skip_group("needs CUDA") == "needs CUDA"
