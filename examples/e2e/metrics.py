"""E2E NLG metrics as the official tool (tuetschek/e2e-metrics, measure_scores.py) computes them.

BLEU and NIST come in the tool's two modes: ``perl`` (its default: mteval-v13a-sig.pl, the E2E challenge's official
scores) and ``python`` (``measure_scores.py -p``: its pymteval.py, which the LoRA paper's Table 3 used). They agree on
BLEU to the printed 4 decimals on the check sets here but not on NIST (7.6290 vs 7.3787 on one of them): NIST's
average reference length and the information weights' lowercasing differ. METEOR, ROUGE-L and CIDEr are the same in
both modes.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
MODES = ("python", "perl")  # how BLEU and NIST are computed: measure_scores.py -p, or its default (mteval Perl)
JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")  # PTB tokenizer and METEOR 1.5 are Java programs

BLEU_ORDER = 4
NIST_ORDER = 5  # mteval counts up to 9-grams, but only these orders reach the two scores


# ---------------------------------------------------------------- reading files


def read_lines(path: str | Path) -> list[str]:
    """The stripped lines of a UTF-8 file (split on every Unicode line break, as Python's codecs reader does)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def read_outputs(path: str | Path) -> list[str]:
    """System outputs: one line per MR (an empty line is an empty output)."""
    return read_lines(path)


def read_grouped_refs(path: str | Path) -> list[list[str]]:
    """References grouped per MR: one per line, blank lines between MRs (a file without one is a single MR)."""
    groups: list[list[str]] = [[]]
    for line in read_lines(path):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    return groups


def check_counts(refs: list[list[str]], outputs: list[str]) -> None:
    """Raise ValueError unless there is exactly one output per reference group, each group non-empty."""
    if not refs:
        raise ValueError("no references")
    if len(refs) != len(outputs):
        raise ValueError(f"{len(refs)} reference groups but {len(outputs)} outputs")
    if not all(refs):
        raise ValueError(f"reference group {[len(g) for g in refs].index(0) + 1} is empty")


# ---------------------------------------------------------------- mteval-v13a: BLEU and NIST

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")  # ASCII punctuation but ' , - . (and space)
_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([.,])")
_PERIOD_COMMA_BEFORE = re.compile(r"([.,])([^0-9])")
_DIGIT_DASH = re.compile(r"([0-9])(-)")
_SPACES = re.compile(r"\s+")


def _split_punctuation(text: str) -> str:
    """mteval-v13a's normalization after lowercasing: SGML entities decoded, punctuation split off, spaces collapsed."""
    text = text.replace("<skipped>", "")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = _PUNCT.sub(r" \1 ", f" {text} ")
    text = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", text)  # split . and , unless preceded by a digit
    text = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", text)  # ... unless followed by a digit
    text = _DIGIT_DASH.sub(r"\1 \2 ", text)
    return _SPACES.sub(" ", text).strip()


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's default tokenization (the tool's Perl mode): ASCII lowercasing, then punctuation split."""
    return _split_punctuation(text.translate(_ASCII_LOWER)).split()


def pymteval_tokenize(text: str) -> list[str]:
    """The tool's pymteval.py tokenization (``-p``): the same split, Unicode lowercasing, and "" -> [""] as it does."""
    return [token.lower() for token in _split_punctuation(text.replace("-\n", "").replace("\n", " ")).split(" ")]


def _ngrams(words: list[str]) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams of orders 1..NIST_ORDER."""
    return Counter(tuple(words[i : i + n]) for n in range(1, NIST_ORDER + 1) for i in range(len(words) - n + 1))


def _ngram_info(ref_sets: list[list[list[str]]]) -> dict[tuple[str, ...], float]:
    """NIST information weights over all references: -log2 P(last word | the words before it)."""
    counts: Counter[tuple[str, ...]] = Counter()
    total_words = 0
    for refs in ref_sets:
        for ref in refs:
            counts.update(_ngrams(ref))
            total_words += len(ref)
    # mteval tests the (n-1)-gram prefix for Perl truth, so a prefix that is the single token "0" counts as none
    return {
        gram: -math.log2(count / (counts[gram[:-1]] if gram[:-1] not in ((), ("0",)) else total_words))
        for gram, count in counts.items()
    }


def _closest_ref_length(ref_lengths: list[int], hyp_length: int) -> int:
    """BLEU's effective reference length: the closest one, the shorter on ties; mteval skips empty references."""
    return min((n for n in ref_lengths if n), key=lambda n: (abs(hyp_length - n), n), default=0)


def _nist_length_penalty(ratio: float) -> float:
    """NIST's brevity penalty: 1 at or above the average reference length, 0.5 at two thirds of it."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def mteval_scores(refs: list[list[str]], outputs: list[str], mode: str = "python") -> dict[str, float]:
    """System-level BLEU and NIST as the E2E tool computes them in ``mode``: "python" (``-p``) or "perl" (default)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_counts(refs, outputs)
    return _python_scores(refs, outputs) if mode == "python" else _perl_scores(refs, outputs)


def _perl_scores(refs: list[list[str]], outputs: list[str]) -> dict[str, float]:
    """BLEU (smoothed, closest reference length) and NIST of the tool's mteval-v13a-sig.pl, to its printed 4 decimals.

    This is the E2E tool's edited mteval-v13a-sig.pl: NIST's average reference length divides the reference
    words by the mean number of (non-empty) references per MR, not by the largest number of references.
    """
    ref_words = [[mteval_tokenize(r) for r in group] for group in refs]
    hyp_words = [mteval_tokenize(o) for o in outputs]
    info = _ngram_info(ref_words)
    refs_per_mr = sum(bool(r) for group in ref_words for r in group) / len(refs)
    ref_total_words = sum(len(r) for group in ref_words for r in group)

    ref_length = 0
    matches = [0] * (NIST_ORDER + 1)
    hyp_counts = [0] * (NIST_ORDER + 1)
    hyp_info = [0.0] * (NIST_ORDER + 1)
    for group, hyp in zip(ref_words, hyp_words, strict=True):
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in group:
            max_ref |= _ngrams(ref)
        ref_length += _closest_ref_length([len(r) for r in group], len(hyp))
        for n in range(1, NIST_ORDER + 1):
            hyp_counts[n] += max(len(hyp) - n + 1, 0)
        for gram, count in _ngrams(hyp).items():
            clipped = min(count, max_ref[gram])
            if clipped:
                matches[len(gram)] += clipped
                hyp_info[len(gram)] += clipped * info[gram]

    bleu = _bleu(ref_length, matches, hyp_counts)
    nist = sum(hyp_info[n] / max(hyp_counts[n], 1) for n in range(1, NIST_ORDER + 1))
    nist *= _nist_length_penalty(hyp_counts[1] / (ref_total_words / refs_per_mr))
    # mteval prints both to 4 decimals, and the official tool parses that printout
    return {"BLEU": round(bleu, 4), "NIST": round(nist, 4)}


def _bleu(ref_length: int, matches: list[int], hyp_counts: list[int]) -> float:
    """mteval-v13a's smoothed BLEU-4: the k-th order without any match counts 1/2^k of a match instead."""
    if hyp_counts[1] == 0:
        return 0.0
    log_precision = 0.0
    smooth = 1
    for n in range(1, BLEU_ORDER + 1):
        if hyp_counts[n] == 0:
            continue
        if matches[n] == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * hyp_counts[n]))
        else:
            log_precision += math.log(matches[n] / hyp_counts[n])
    return math.exp(log_precision / BLEU_ORDER + min(0.0, 1 - ref_length / hyp_counts[1]))


def _python_scores(refs: list[list[str]], outputs: list[str]) -> dict[str, float]:
    """BLEU and NIST of the tool's pymteval.py (``measure_scores.py -p``), unrounded, quirks included.

    Unlike the Perl mode: BLEU has no smoothing beyond a 1e-15 floor on zero matches, and its candidate n-gram
    counts add len - n + 1 even when negative; the closest reference may be empty; NIST's reference length is
    the sum over MRs of each MR's mean reference length, and its information weights use Unicode lowercasing.
    """
    ref_words = [[pymteval_tokenize(r) for r in group] for group in refs]
    hyp_words = [pymteval_tokenize(o) for o in outputs]
    ref_counts: Counter[tuple[str, ...]] = Counter()  # every reference n-gram occurrence; () counts the words
    ref_length = avg_ref_length = 0.0
    hits = [0] * (NIST_ORDER + 1)
    hyp_counts = [0] * (NIST_ORDER + 1)
    matched: list[Counter[tuple[str, ...]]] = []
    for group, hyp in zip(ref_words, hyp_words, strict=True):
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in group:
            grams = _ngrams(ref)
            max_ref |= grams
            ref_counts.update(grams)
            ref_counts[()] += len(ref)
        clipped = _ngrams(hyp) & max_ref
        matched.append(clipped)
        for n in range(1, NIST_ORDER + 1):
            hyp_counts[n] += len(hyp) - n + 1
        for gram, count in clipped.items():
            hits[len(gram)] += count
        ref_length += len(min(group, key=lambda r: (abs(len(r) - len(hyp)), len(r))))
        avg_ref_length += sum(len(r) for r in group) / len(group)

    brevity = 1.0
    if hyp_counts[1] <= ref_length:
        brevity = math.exp(1.0 - ref_length / (hyp_counts[1] or 1e-5))
    log_precision = sum(math.log(max(hits[n], 1e-15) / max(hyp_counts[n], 1e-9)) for n in range(1, BLEU_ORDER + 1))
    bleu = brevity * math.exp(log_precision / BLEU_ORDER)

    info = [0.0] * (NIST_ORDER + 1)
    for clipped in matched:
        for gram, count in clipped.items():
            info[len(gram)] += count * math.log2(ref_counts[gram[:-1]] / ref_counts[gram])
    nist = sum(info[n] / hyp_counts[n] for n in range(1, NIST_ORDER + 1) if hyp_counts[n])
    nist *= _nist_length_penalty(hyp_counts[1] / avg_ref_length)
    return {"BLEU": bleu, "NIST": nist}


# ---------------------------------------------------------------- COCO caption code: METEOR, ROUGE-L, CIDEr


def coco_unavailable() -> str | None:
    """Why METEOR, ROUGE-L and CIDEr cannot be computed here (the PTB tokenizer and METEOR run on Java), or None."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    java = shutil.which("java")
    if java is None or subprocess.run([java, "-version"], capture_output=True).returncode != 0:
        return "java not found (install a Java runtime, e.g. openjdk-17-jre-headless)"
    return None


@functools.cache
def meteor():
    """One METEOR 1.5 server process, kept for later calls: loading its paraphrase table takes seconds."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def coco_scores(refs: list[list[str]], outputs: list[str]) -> dict[str, float]:
    """METEOR 1.5, ROUGE-L and CIDEr of pycocoevalcap on PTB-tokenized, lowercased text (needs Java)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    check_counts(refs, outputs)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in group] for i, group in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": o}] for i, o in enumerate(outputs)})
    scores = {}
    for name, scorer in (("METEOR", meteor()), ("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        scores[name] = float(scorer.compute_score(gts, res)[0])
    return scores


def score(refs: list[list[str]], outputs: list[str], mode: str = "python") -> dict[str, float]:
    """The E2E tool's scores in METRICS order, BLEU and NIST in ``mode`` (see MODES); without Java only BLEU and NIST,
    with a warning on stderr."""
    scores = mteval_scores(refs, outputs, mode)
    reason = coco_unavailable()
    if reason is None:
        scores.update(coco_scores(refs, outputs))
    else:
        print(f"warning: {reason}; {', '.join(JAVA_METRICS)} are omitted", file=sys.stderr)
    return scores
