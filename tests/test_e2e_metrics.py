"""The E2E evaluator reproduces the official e2e-metrics scores and rejects malformed input."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "examples" / "e2e"
CHECK = ROOT.parent / "shared" / "data" / "e2e-metrics-check"
sys.path.insert(0, str(E2E))

import metrics  # noqa: E402

# ../shared/data/README.md: the official tool's scores on the two check sets (its default, Perl mode)
OFFICIAL = {
    "system-a": ("test-refs-grouped.txt", "system-a-output.txt", (0.6450, 7.6290, 0.4134, 0.6897, 1.9139)),
    "dev10": ("dev10-refs-grouped.txt", "dev10-output.txt", (0.7203, 7.8212, 0.4801, 0.7910, 2.3039)),
}
# The tool's -p mode (metrics/pymteval.py of tuetschek/e2e-metrics at 1b9c4d8, run on these files on 2026-12-04 with
# past.utils.old_div shimmed as true division): BLEU and NIST unrounded. system-a's NIST, 7.3787, is also published
# in ../shared/data/README.md.
PYTHON_MODE = {
    "system-a": (0.6449621897082248, 7.378746387092815),
    "dev10": (0.7202928494322162, 7.788887609555574),
}

needs_check_data = pytest.mark.skipif(not CHECK.is_dir(), reason=f"check data not found at {CHECK}")
COCO_UNAVAILABLE = metrics.coco_unavailable()
needs_java = pytest.mark.skipif(COCO_UNAVAILABLE is not None, reason=str(COCO_UNAVAILABLE))


def load(check: str) -> tuple[list[list[str]], list[str], dict[str, float]]:
    refs, outputs, scores = OFFICIAL[check]
    return (
        metrics.read_grouped_refs(CHECK / refs),
        metrics.read_outputs(CHECK / outputs),
        dict(zip(metrics.METRICS, scores, strict=True)),
    )


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(E2E / "evaluate.py"), *map(str, args)], capture_output=True, text=True, env=env
    )


def assert_printed_equal(scores: dict[str, float], official: dict[str, float], names: tuple[str, ...]) -> None:
    """Equal at the official tool's printed precision (4 decimals)."""
    assert {n: f"{scores[n]:.4f}" for n in names} == {n: f"{official[n]:.4f}" for n in names}


@needs_check_data
@pytest.mark.parametrize("check", OFFICIAL)
def test_bleu_nist_perl_mode_reproduce_official(check):
    refs, outputs, official = load(check)
    assert_printed_equal(metrics.mteval_scores(refs, outputs, "perl"), official, ("BLEU", "NIST"))


@needs_check_data
@pytest.mark.parametrize("check", PYTHON_MODE)
def test_bleu_nist_python_mode_reproduce_the_tools_p_mode(check):
    refs, outputs, _ = load(check)
    scores = metrics.mteval_scores(refs, outputs, "python")
    assert (scores["BLEU"], scores["NIST"]) == pytest.approx(PYTHON_MODE[check], rel=1e-12)


def test_python_mode_keeps_pymteval_quirks():
    """Unicode lowercasing, an empty output counted as one empty token, unsmoothed BLEU: the tool's -p mode gave
    BLEU 0.6759805309448959 and NIST 1.463892358668917 on this (pymteval.py at 1b9c4d8, 2026-12-04); the Perl mode
    differs."""
    refs = [["ÉCLAIR is a café near the river .", "Éclair, a CAFÉ, is by the river."], ["It is cheap ."], ["A pub ."]]
    outputs = ["éclair is a café by the river.", "", "pub"]
    python = metrics.mteval_scores(refs, outputs, "python")
    assert (python["BLEU"], python["NIST"]) == pytest.approx((0.6759805309448959, 1.463892358668917), rel=1e-12)
    assert metrics.mteval_scores(refs, outputs, "perl") == {"BLEU": 0.2577, "NIST": 0.3904}
    assert metrics.pymteval_tokenize("") == [""] and metrics.mteval_tokenize("") == []


def test_unknown_mode_is_an_error_naming_the_modes():
    with pytest.raises(ValueError, match="mode must be one of python, perl, got 'moses'"):
        metrics.mteval_scores([["a"]], ["a"], "moses")


@needs_check_data
@needs_java
def test_coco_metrics_reproduce_official_system_a():
    refs, outputs, official = load("system-a")
    assert len(refs) == len(outputs) == 630
    assert_printed_equal(metrics.coco_scores(refs, outputs), official, metrics.JAVA_METRICS)


@needs_check_data
@needs_java
def test_cli_json_reproduces_official_dev10(capsys):
    # in-process, so that it reuses the METEOR server of the test above
    spec = importlib.util.spec_from_file_location("e2e_evaluate", E2E / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    evaluate.main([str(CHECK / OFFICIAL["dev10"][0]), str(CHECK / OFFICIAL["dev10"][1]), "--json", "--mteval", "perl"])
    scores = json.loads(capsys.readouterr().out)
    assert list(scores) == list(metrics.METRICS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values())
    assert_printed_equal(scores, load("dev10")[2], metrics.METRICS)


@needs_check_data
def test_cli_without_java_omits_java_metrics(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no java on PATH
    files = (CHECK / OFFICIAL["dev10"][0], CHECK / OFFICIAL["dev10"][1])
    result = run_cli(*files, "--json", "--mteval", "perl", env=env)
    assert result.returncode == 0, result.stderr
    assert "java not found" in result.stderr and "METEOR" in result.stderr
    scores = json.loads(result.stdout)
    assert list(scores) == ["BLEU", "NIST"]
    assert_printed_equal(scores, load("dev10")[2], ("BLEU", "NIST"))

    text = run_cli(*files, "--mteval", "perl", env=env).stdout
    assert "BLEU: 0.7203" in text and "NIST: 7.8212" in text and "METEOR" not in text
    text = run_cli(*files, env=env).stdout  # the default: the tool's -p mode, as the LoRA paper scored
    assert "python mode" in text and "BLEU: 0.7203" in text and "NIST: 7.7889" in text


def test_cli_count_mismatch_names_files_and_counts(tmp_path):
    refs = tmp_path / "refs.txt"
    outputs = tmp_path / "outputs.txt"
    refs.write_text("a b c\nthe a b\n\nd e f\n\ng h i\n", encoding="utf-8")
    outputs.write_text("a b c\nd e f\n", encoding="utf-8")
    result = run_cli(refs, outputs, "--json")
    assert result.returncode != 0 and result.stdout == ""
    assert str(refs) in result.stderr and str(outputs) in result.stderr
    assert "3 reference groups but 2 outputs" in result.stderr
    with pytest.raises(ValueError, match="3 reference groups but 2 outputs"):
        metrics.score(metrics.read_grouped_refs(refs), metrics.read_outputs(outputs))


def test_cli_missing_file_is_an_error(tmp_path):
    result = run_cli(tmp_path / "nope.txt", tmp_path / "nope2.txt")
    assert result.returncode != 0 and "nope.txt" in result.stderr


def test_read_grouped_refs(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_bytes(b"first one \r\nfirst two\r\n\r\n\r\nsecond\r\n\r\n")
    assert metrics.read_grouped_refs(path) == [["first one", "first two"], ["second"]]
    path.write_text("one MR\nthree\nreferences\n", encoding="utf-8")
    assert metrics.read_grouped_refs(path) == [["one MR", "three", "references"]]


def test_mteval_tokenize_follows_mteval_v13a():
    assert metrics.mteval_tokenize("The Eagle's £20-25, 3.5 stars.") == [
        "the", "eagle's", "£20", "-", "25", ",", "3.5", "stars", ".",
    ]  # fmt: skip
    tokens = ["Éclair", "&", "co", "(", "kids-friendly", ")"]  # ASCII-only lowercasing; entities decoded
    assert metrics.mteval_tokenize("ÉCLAIR &amp; Co (kids-friendly)") == tokens
    assert metrics.mteval_tokenize("  ") == []


def test_bleu_is_one_for_an_exact_reference_and_smoothed_when_nothing_matches():
    refs = [["a cheap pub near the river .", "the pub is cheap"], ["Zizzi is a coffee shop ."]]
    assert metrics.mteval_scores(refs, ["the pub is cheap", "Zizzi is a coffee shop."])["BLEU"] == 1.0
    # no 4-gram matches: mteval counts 1/2 of a match instead of zero, so BLEU stays above 0
    assert 0 < metrics.mteval_scores([["a b c d e"]], ["a b c x e"])["BLEU"] < 0.5


def test_nist_information_weights():
    info = metrics._ngram_info([[["a", "b", "a"], ["a", "0", "b"]]])
    assert info[("a",)] == pytest.approx(-math.log2(3 / 6))
    assert info[("a", "b")] == pytest.approx(-math.log2(1 / 3))  # P(b | a): "a b" once, "a" three times
    # mteval tests the prefix for Perl truth: the prefix "0" counts as no prefix (divides by all words)
    assert info[("0", "b")] == pytest.approx(-math.log2(1 / 6))
