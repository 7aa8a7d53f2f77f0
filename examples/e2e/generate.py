r"""Generate one E2E output per unique MR with the LoRA paper's beam search; write outputs and grouped references.

    python examples/e2e/generate.py --run runs/lora-m --data e2e --out runs/lora-m/test     # after train.py
    python examples/e2e/generate.py --model gpt2-medium --adapter ADAPTER_DIR --data e2e --out OUT
    python examples/e2e/generate.py --model MERGED_MODEL_DIR --data e2e --out OUT
    python examples/e2e/generate.py --run runs/lora-a --serve a=runs/lora-a --serve b=runs/lora-b --out OUT

Writes ``OUT/outputs.txt`` (one line per MR), ``OUT/refs.txt`` (the MR's references, one per line,
a blank line between MRs: the evaluator's input format) and ``OUT/mrs.txt``.

The decoding is the paper's (gpt2_beam.py and gpt2_decode.py; see beam.py): 10 beams, length penalty 0.8, no
repeated 4-gram within the output, stop at end-of-text or "\n\n", up to 64 new tokens, the prompt cut to its last
``--max-length`` - 64 tokens; the text is cut at the first end-of-text and "\n\n" and stripped. ``--recipe paper``
runs the model in fp32 as the paper did; ``--recipe bf16`` in bfloat16 (faster on a GPU; see the README).

``--serve NAME=ADAPTER`` (repeated) serves several adapters of one base model at once: each MR gets
one adapter (``--assign``), every batch mixes MRs of different adapters and runs as one batch through
the LoRA layers (``fastlora.use_adapters``); beam search keeps each sequence's adapter. Besides the
files above, ``OUT/assignment.txt`` names each MR's adapter and ``OUT/<NAME>/`` holds that adapter's
MRs alone (outputs, refs, mrs) for evaluate.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from beam import BeamConfig, beam_search

import fastlora


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a train.py run directory: its base model and final adapter/model")
    p.add_argument("--model", help="base model: gpt2 | gpt2-medium | gpt2-large | PATH (or merged weights)")
    p.add_argument("--adapter", help="LoRA adapter directory (fastlora or peft format)")
    p.add_argument("--no-adapter", action="store_true", help="with --run: the base model alone (untrained baseline)")
    p.add_argument("--serve", action="append", default=[], metavar="NAME=ADAPTER",
                   help="serve this adapter (a directory, or a train.py LoRA run) under NAME; repeat for several")
    p.add_argument("--assign", default="cycle",
                   help="with --serve: 'cycle' (MR i gets the i-th adapter, cyclically) or a file with one adapter "
                        "name per MR ('-' for the base model alone)")
    p.add_argument("--data", default="synthetic", help="synthetic | e2e | txt | hf | a .csv/.txt file")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir", default=str(common.DEFAULT_CACHE))
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--limit", type=int, help="only the first N unique MRs")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", choices=common.RECIPES, default="paper",
                   help="paper: the model in fp32, as the paper; bf16: the model in bfloat16")
    p.add_argument("--batch-size", type=int, default=16, help="MRs per beam search (does not change the outputs)")
    p.add_argument("--num-beams", type=int, default=10)
    p.add_argument("--length-penalty", type=float, default=0.8, help="hypothesis score: log-prob sum / length ** this")
    p.add_argument("--no-repeat-ngram-size", type=int, default=4, help="within the generated tokens; 0: off")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512,
                   help="the prompt is cut to its last (this - max new tokens) tokens, as the paper's 512 - 64")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[str, str | None, str]:
    """(model to load, adapter dir or None, tokenizer source) from --run or --model/--adapter (with --serve,
    the base model: the served adapters are loaded by name)."""
    if args.run:
        info = common.read_json(Path(args.run) / "run.json")
        if args.no_adapter or args.serve:
            return info["base"], None, info["base"]
        if info["method"] == "full":
            return info["final"], None, info["final"]
        return info["base"], info["final"], info["base"]
    if not args.model:
        raise SystemExit("give --run RUN_DIR or --model (with --adapter for a LoRA adapter)")
    return args.model, args.adapter, args.model


def load(model_ref: str, adapter: str | None, device: torch.device, recipe: str = "paper") -> torch.nn.Module:
    """The model in eval mode, fp32 (or bf16 for ``--recipe bf16``); a LoRA adapter is loaded and merged (zero
    overhead at inference)."""
    model = common.load_model(model_ref)
    if adapter:
        fastlora.load_adapter(model, adapter)
        fastlora.merge(model, exact=False)  # for generation only: no copy of the base weights kept to unmerge
    dtype = torch.bfloat16 if recipe == "bf16" else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def served_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=ADAPTER`` specs as {name: adapter directory}; a train.py run stands for its final adapter."""
    served = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--serve takes NAME=ADAPTER_DIR, got {spec!r}")
        if name in served:
            raise SystemExit(f"--serve names adapter {name!r} twice")
        run_json = Path(path) / "run.json"
        served[name] = common.read_json(run_json)["final"] if run_json.is_file() else path
    return served


def assignment(spec: str, names: list[str], count: int) -> list[str | None]:
    """Each MR's adapter name (None: the base model alone), from 'cycle' or a file of names."""
    if spec == "cycle":
        return [names[i % len(names)] for i in range(count)]
    lines = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    if len(lines) < count:
        raise SystemExit(f"--assign {spec}: {len(lines)} names for {count} MRs")
    unknown = sorted({n for n in lines[:count] if n != "-" and n not in names})
    if unknown:
        raise SystemExit(f"--assign {spec}: adapters {unknown} are not served (served: {names})")
    return [None if n == "-" else n for n in lines[:count]]


def stop_ids(tokenizer) -> tuple[int, ...]:
    r"""The paper's stop tokens: end-of-text, and "\n\n" where the vocabulary has it as one token (GPT-2's 628)."""
    blank_line = tokenizer("\n\n")["input_ids"]
    return (tokenizer.eos_token_id, *blank_line) if len(blank_line) == 1 else (tokenizer.eos_token_id,)


def clean(text: str, eos: str = common.EOS) -> str:
    r"""gpt2_decode.py's cleaning: the text before the first end-of-text and the first "\n\n", stripped; any other
    line break becomes a space, so that the output stays one line (the paper's files would break there)."""
    return " ".join(text.split(eos)[0].split("\n\n")[0].strip().splitlines())


def generate(model, tokenizer, mrs: list[common.MR], args: argparse.Namespace,
             adapters: list[str | None] | None = None) -> list[str]:
    """One beam-search output per MR, ``args.batch_size`` MRs at a time; with ``adapters``, MR i runs with adapter
    ``adapters[i]`` (every beam of an MR keeps its MR's adapter)."""
    keep = args.max_length - args.max_new_tokens
    if keep < 1:
        raise SystemExit(f"--max-length {args.max_length} leaves no room for a prompt after "
                         f"--max-new-tokens {args.max_new_tokens}")
    config = BeamConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                        length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                        stop_ids=stop_ids(tokenizer))
    outputs = []
    for start in common.progress(range(0, len(mrs), args.batch_size), "generate", disable=args.no_progress):
        batch = mrs[start:start + args.batch_size]
        prompts = [common.prompt_ids(tokenizer, mr)[-keep:] for mr in batch]
        names = adapters[start:start + args.batch_size] if adapters is not None else None
        tokens = beam_search(model, prompts, config, tokenizer.eos_token_id, names)
        outputs += [clean(tokenizer.decode(t, skip_special_tokens=False, clean_up_tokenization_spaces=False))
                    for t in tokens]
    return outputs


def write_outputs(out: Path, groups: list[tuple[common.MR, list[str]]], outputs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    common.write_atomic(out / "outputs.txt", "".join(o + "\n" for o in outputs))
    common.write_atomic(out / "refs.txt", "\n".join("".join(r + "\n" for r in refs) for _, refs in groups))
    common.write_atomic(out / "mrs.txt", "".join(common.format_mr(mr) + "\n" for mr, _ in groups))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_ref, adapter, tokenizer_ref = resolve(args)
    groups = common.group_by_mr(common.load_examples(args.data, args.split, args.data_dir, args.cache_dir, args.seed))
    groups = groups[:args.limit] if args.limit else groups
    tokenizer = common.load_tokenizer(tokenizer_ref)
    model = load(model_ref, adapter, device, args.recipe)
    out = Path(args.out)
    adapters = None
    if args.serve:
        served = served_adapters(args.serve)
        for name, path in served.items():
            fastlora.load_adapter(model, path, name=name)
        model.eval()  # the new LoRA layers too: no dropout while generating
        adapters = assignment(args.assign, list(served), len(groups))
    outputs = generate(model, tokenizer, [mr for mr, _ in groups], args, adapters)
    write_outputs(out, groups, outputs)
    if adapters is not None:
        common.write_atomic(out / "assignment.txt", "".join(f"{n or '-'}\n" for n in adapters))
        for name in dict.fromkeys(adapters):
            picked = [i for i, n in enumerate(adapters) if n == name]
            write_outputs(out / (name or "base"), [groups[i] for i in picked], [outputs[i] for i in picked])
    print(f"wrote {len(outputs)} outputs to {out / 'outputs.txt'} and grouped references to {out / 'refs.txt'}")
    return out


if __name__ == "__main__":
    main()
