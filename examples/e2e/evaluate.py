"""Score E2E outputs with BLEU, NIST, METEOR, ROUGE-L and CIDEr as the official E2E metrics tool does.

    python examples/e2e/evaluate.py REFS OUTPUTS              # BLEU/NIST as measure_scores.py -p (the LoRA paper's)
    python examples/e2e/evaluate.py REFS OUTPUTS --mteval perl  # as measure_scores.py by default (the challenge's)
"""

from __future__ import annotations

import argparse
import json

from metrics import METRICS, MODES, check_counts, read_grouped_refs, read_outputs, score


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("refs", help="references: one per line, a blank line between MRs")
    parser.add_argument("outputs", help="system outputs: one line per MR, in the same order")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    parser.add_argument("--mteval", choices=MODES, default="python",
                        help="BLEU and NIST as the tool's -p mode computes them (python, the LoRA paper's choice) or "
                             "as its default Perl mode (perl, the E2E challenge's official scores)")
    args = parser.parse_args(argv)

    try:
        refs = read_grouped_refs(args.refs)
        outputs = read_outputs(args.outputs)
        check_counts(refs, outputs)
    except (OSError, UnicodeDecodeError) as err:
        parser.error(str(err))
    except ValueError as err:
        parser.error(f"{args.refs} and {args.outputs} do not match: {err}")

    scores = score(refs, outputs, args.mteval)
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"SCORES (BLEU and NIST: {args.mteval} mode):\n==============")
        for name in METRICS:
            if name in scores:
                print(f"{name}: {scores[name]:.4f}")


if __name__ == "__main__":
    main()
