"""In CI (CI=true) a test that skips for want of ../shared/data fails (an error at setup, where skipif acts);
other skips, and every skip outside CI, stay skips."""

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

TESTS = """
import pytest

@pytest.mark.skipif(True, reason="the E2E data is not at {data}")
def test_needs_data():
    pass

@pytest.mark.skipif(True, reason="java not found")
def test_needs_java():
    pass

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False
"""


@pytest.mark.parametrize(("ci", "outcomes"), [("true", {"errors": 1, "skipped": 1, "xfailed": 1}),
                                              ("", {"skipped": 2, "xfailed": 1})])
def test_missing_shared_data_fails_in_ci_and_skips_elsewhere(pytester, monkeypatch, ci, outcomes):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    # the copied conftest looks for ../shared/data beside its own directory's parent, as ours does
    pytester.makepyfile(test_skips=TESTS.format(data=pytester.path.parents[1] / "shared" / "data" / "e2e"))
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest("-p", "no:cacheprovider", "-ra")
    result.assert_outcomes(**outcomes)
    if ci:
        result.stdout.fnmatch_lines(["*CI=true but the data is missing*", "*CI: 1 test(s) skipped*"])
