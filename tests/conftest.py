"""Shared test set-up.

Tests marked `live` need root and BPF. They skip where those are missing, with the reason;
with DYNVM_REQUIRE_LIVE=1 (CI) such a skip is turned into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
PONE_FIXTURES = FIXTURES / "pone-virt_release"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and item.get_closest_marker("live") is not None
            and os.environ.get("DYNVM_REQUIRE_LIVE") == "1"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"live test skipped but DYNVM_REQUIRE_LIVE=1: {reason}"


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Write {relative path: content} under root (a fixture sysfs/procfs tree); returns root."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[dict[str, str | bytes]], Path]:
    """make_tree({"kernel/mm/pone/pone_run": "1"}) -> tmp_path holding those files."""
    return lambda files: write_tree(tmp_path, files)
