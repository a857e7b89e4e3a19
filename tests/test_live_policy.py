"""The rule CI relies on: with DYNVM_REQUIRE_LIVE=1 a skipped live test fails."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

LIVE_TEST = """
import pytest

@pytest.mark.live
def test_needs_bpf():
    pytest.skip("no BPF here")

def test_plain_skip():
    pytest.skip("not live: stays a skip")
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    live: needs root and BPF\n")
    pytester.makepyfile(LIVE_TEST)
    return pytester


def test_live_skip_is_a_skip_by_default(suite, monkeypatch):
    monkeypatch.delenv("DYNVM_REQUIRE_LIVE", raising=False)
    suite.runpytest().assert_outcomes(skipped=2)


def test_live_skip_fails_when_live_is_required(suite, monkeypatch):
    monkeypatch.setenv("DYNVM_REQUIRE_LIVE", "1")
    result = suite.runpytest()
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*live test skipped but DYNVM_REQUIRE_LIVE=1*no BPF here*"])
