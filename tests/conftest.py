import sys
from collections import Counter
from pathlib import Path

# tests import their helpers (tiny_models, inputs, reference) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))

MAX_SKIP_GROUPS = 30


def skip_reason(report) -> str:
    """The reason text of a skipped test report (``pytest.skip`` / ``skipif`` / ``importorskip``)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_group(reason: str) -> str:
    """Reasons grouped by their text before the first ': ' (what follows is usually the error's detail)."""
    head, sep, _ = reason.partition(": ")
    return head if sep and head else reason


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After every run, how many tests were skipped and why, grouped by reason (no -rs needed)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if getattr(r, "longrepr", None) is not None]
    if not skipped:
        return
    total = sum(len(v) for k, v in terminalreporter.stats.items() if k in ("passed", "failed", "skipped", "error",
                                                                          "xfailed", "xpassed"))  # fmt: skip
    groups = Counter(skip_group(skip_reason(r)) for r in skipped)
    terminalreporter.section(f"{len(skipped)} of {total} skipped, by reason", sep="-")
    for reason, count in groups.most_common(MAX_SKIP_GROUPS):
        terminalreporter.write_line(f"{count:6d}  {reason}")
    rest = groups.most_common()[MAX_SKIP_GROUPS:]
    if rest:
        terminalreporter.write_line(f"{sum(c for _, c in rest):6d}  ({len(rest)} other reasons; -rs lists all)")
