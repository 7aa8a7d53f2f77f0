"""The E2E example on the real E2E data: a tiny model trained on the dev set must clear a BLEU bar on the test set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_e2e import FAST, WIDE_LORA, run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "e2e"
sys.path.insert(0, str(ROOT / "examples" / "e2e"))
import metrics  # noqa: E402  (the evaluator's module: BLEU/NIST need no Java)

TEST_MRS = 40
# The dev set's longest prompt + reference is 144 tokens (the tiny BPE vocabulary; the tokenizer is trained on the
# same texts for every seed): cutting at 160 leaves every fine-tuning example whole, as the paper's 512 does, and
# cuts only the stand-in pretraining's documents (all references of one MR, up to 1138 tokens), its main cost.
MAX_LENGTH = 160

pytestmark = pytest.mark.slow  # the end-to-end runs: CI's second step (pytest -m slow)


def copy_baseline(mrs: list[str]) -> list[str]:
    """An output that only lists the MR's values ("Blue Spice coffee shop city centre"): right words, no language."""
    import common

    return [" ".join(value for _, value in common.parse_mr(mr)) for mr in mrs]


@pytest.mark.skipif(not (DATA / "devset.csv").is_file(), reason=f"the E2E data is not at {DATA}")
def test_tiny_lora_trained_on_real_dev_set_clears_bleu_bar_on_test_set(tmp_path):
    out = tmp_path / "dev-run"
    run("train.py", "--model", "tiny", "--data", str(DATA / "devset.csv"), "--out", str(out), "--max-steps", "600",
        "--tiny-pretrain-steps", "200", "--max-length", str(MAX_LENGTH), "--lr", "4e-3", "--warmup-steps", "30",
        "--log-every", "50", *WIDE_LORA, *FAST)
    import common

    tokenizer = common.load_tokenizer(str(out / "base"))
    longest = max(len(common.encode(tokenizer, e, 10**6)[0]) for e in common.read_csv(DATA / "devset.csv"))
    assert longest <= MAX_LENGTH, longest  # the fine-tuning is the paper's: no example cut
    generated = tmp_path / "test"
    run("generate.py", "--run", str(out), "--data", str(DATA / "testset_w_refs.csv"), "--limit", str(TEST_MRS),
        "--batch-size", str(TEST_MRS), "--out", str(generated), *FAST)
    refs = metrics.read_grouped_refs(generated / "refs.txt")
    outputs = metrics.read_outputs(generated / "outputs.txt")
    bleu = metrics.mteval_scores(refs, outputs)["BLEU"]
    baseline = metrics.mteval_scores(refs, copy_baseline((generated / "mrs.txt").read_text().splitlines()))["BLEU"]
    # The bar, 0.2. On these 40 MRs (measured 2026-12-04, the paper's recipe, reference backend, 1 thread, BLEU of
    # the tool's -p mode): listing the MR's values scores 0.120 (computed below), the tiny base before fine-tuning (a
    # language model of the dev references that has never seen an MR) 0.117, and this run 0.294 (with --seed 1 and 2,
    # which change the base too: 0.291 and 0.326). Clearing 0.2 and 1.5x the value-listing baseline needs fluent text
    # that follows the MR, which only the fine-tuning can have taught; the margin (0.09 or more) covers numeric
    # differences between backends and thread counts that change some beam-search choices.
    print(f"test BLEU on {TEST_MRS} MRs: {bleu:.4f} (copy baseline {baseline:.4f})")
    assert bleu > max(0.2, 1.5 * baseline), (bleu, baseline)
