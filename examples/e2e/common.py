"""Shared pieces of the GPT-2 E2E example: data readers, prompts, synthetic data, tokenizer and model loading."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastlora.atomic import write_atomic  # noqa: F401  (the examples write result files through it: atomic, durable)

SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
# The LoRA paper's .txt files name the slots differently; map them to the official names.
TXT_SLOT_NAMES = {"name": "name", "Type": "eatType", "food": "food", "price": "priceRange",
                  "customer rating": "customer rating", "area": "area", "family friendly": "familyFriendly",
                  "near": "near"}
PROMPT_SLOT_NAMES = {official: txt for txt, official in TXT_SLOT_NAMES.items()}
EOS = "<|endoftext|>"

OFFICIAL_URL = "https://raw.githubusercontent.com/tuetschek/e2e-dataset/master/"
# (bytes, sha256) of the canonical files, as also recorded by the Hugging Face e2e_nlg builder.
OFFICIAL_FILES = {
    "trainset.csv": (9340189, "f27d48df45815288ab15619d47a79028c300fbb7f42e373668aba0b98c1d57c6"),
    "devset.csv": (1161305, "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9"),
    "testset_w_refs.csv": (1310822, "edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd"),
}
CSV_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
TXT_FILES = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}
HF_DATASET = "tuetschek/e2e_nlg"
HF_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
DEFAULT_CACHE = Path(os.environ.get("E2E_CACHE", Path.home() / ".cache" / "fastlora-e2e"))
# paper: the LoRA paper's recipe, fp32 throughout; bf16: the same with bf16 autocast in training and a bf16 model in
# beam search (the one deliberate difference, for speed on a GPU; its effect is measured in the README).
RECIPES = ("paper", "bf16")

MR = tuple[tuple[str, str], ...]


class DataError(ValueError):
    """A data file is missing, corrupt or malformed (the message says which and where)."""


@dataclass(frozen=True)
class Example:
    """One meaning representation (slot, value pairs in source order) and one reference text."""

    mr: MR
    ref: str


# ---------------------------------------------------------------------------------------------- parsing

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(,|$)")


def parse_mr(text: str) -> MR:
    """``name[X], eatType[Y], ...`` -> (("name", "X"), ("eatType", "Y"), ...); ValueError if malformed."""
    pairs, pos = [], 0
    while pos < len(text):
        match = _MR_ITEM.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"malformed meaning representation at character {pos}: {text!r}")
        slot = match.group(1)
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r} in {text!r} (known: {', '.join(SLOTS)})")
        pairs.append((slot, match.group(2)))
        pos = match.end()
    if not pairs:
        raise ValueError("empty meaning representation")
    return tuple(pairs)


def format_mr(mr: MR) -> str:
    """The official string form ``name[X], eatType[Y]``."""
    return ", ".join(f"{slot}[{value}]" for slot, value in mr)


def read_csv(path: str | Path) -> list[Example]:
    """Examples from an official E2E CSV (``mr,ref``; or ``MR`` only, giving empty refs)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if header not in (["mr", "ref"], ["mr"]):
            raise DataError(f"{path}:1: expected the header 'mr,ref' (or 'MR'), got {','.join(header)!r}")
        examples, line = [], reader.line_num + 1
        for row in reader:
            if row:
                examples.append(_csv_example(row, len(header), path, line))
            line = reader.line_num + 1
    return examples


def _csv_example(row: list[str], width: int, path: Path, line: int) -> Example:
    if len(row) != width:
        raise DataError(f"{path}:{line}: expected {width} fields, got {len(row)}: {row!r}")
    try:
        return Example(parse_mr(row[0]), row[1] if width == 2 else "")
    except ValueError as error:
        raise DataError(f"{path}:{line}: {error}") from None


def read_txt(path: str | Path) -> list[Example]:
    """Examples from the LoRA paper's format: ``name : X | Type : Y ||reference`` per line."""
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                try:
                    examples.append(_txt_example(text.rstrip("\r\n")))
                except ValueError as error:
                    raise DataError(f"{path}:{number}: {error}") from None
    return examples


def _txt_example(text: str) -> Example:
    if text.count("||") != 1:
        raise ValueError(f"expected exactly one '||' between the MR and the reference: {text!r}")
    source, ref = text.split("||")
    pairs = []
    for item in source.split("|"):
        slot, sep, value = item.partition(" : ")
        if not sep or slot.strip() not in TXT_SLOT_NAMES or not value.strip():
            raise ValueError(f"malformed slot {item.strip()!r} (expected 'slot : value' with a known slot)")
        pairs.append((TXT_SLOT_NAMES[slot.strip()], value.strip()))
    return Example(tuple(pairs), ref.strip())


def group_by_mr(examples: Iterable[Example]) -> list[tuple[MR, list[str]]]:
    """Unique MRs in first-seen order, each with all of its references."""
    groups: dict[MR, list[str]] = {}
    for example in examples:
        groups.setdefault(example.mr, []).append(example.ref)
    return list(groups.items())


# --------------------------------------------------------------------------------------------- sources

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, name: str | None = None) -> None:
    """Raise DataError unless ``path`` has the canonical size and checksum of the official file ``name``."""
    name = name or path.name
    size, checksum = OFFICIAL_FILES[name]
    if path.stat().st_size != size or sha256(path) != checksum:
        raise DataError(f"{path} is not the official {name} ({size} bytes, sha256 {checksum}); "
                        f"delete it and download it again from {OFFICIAL_URL}{name}")


def download(name: str, cache_dir: Path, timeout: float = 30.0) -> Path:
    """Fetch an official CSV into ``cache_dir`` and return its path; only a verified file is ever renamed in."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target, temp = cache_dir / name, cache_dir / f".{name}.part"
    try:
        with urllib.request.urlopen(OFFICIAL_URL + name, timeout=timeout) as response, open(temp, "wb") as out:
            shutil.copyfileobj(response, out)
        verify(temp, name)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def official_csv(split: str, data_dir: Path | None, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The verified official CSV for ``split``: from ``data_dir``, the cache, or downloaded into the cache."""
    name = CSV_FILES[split]
    for folder in (data_dir, cache_dir):
        if folder is not None and (folder / name).is_file():
            if name in OFFICIAL_FILES:
                verify(folder / name)
            return folder / name
    try:
        return download(name, cache_dir)
    except (urllib.error.URLError, OSError) as error:
        where = f"{data_dir} or {cache_dir}" if data_dir else str(cache_dir)
        raise DataError(f"{name} (the E2E {split} split) is not in {where} and downloading {OFFICIAL_URL}{name} "
                        f"failed ({error}). Offline, put the official file {name} from "
                        f"https://github.com/tuetschek/e2e-dataset into {where}.") from None


def read_hf(split: str) -> list[Example]:
    """The split from the Hugging Face dataset e2e_nlg, now ``tuetschek/e2e_nlg`` (needs ``datasets`` and the hub)."""
    try:
        import datasets
    except ImportError:
        raise DataError("--data hf needs the 'datasets' package (pip install datasets)") from None
    try:
        rows = datasets.load_dataset(HF_DATASET, split=HF_SPLITS[split])
    except Exception as error:
        raise DataError(f"could not load the Hugging Face dataset {HF_DATASET} ({error}); "
                        "use --data e2e to read or download the official CSVs instead") from None
    return [Example(parse_mr(row["meaning_representation"]), row["human_reference"]) for row in rows]


def load_examples(data: str, split: str, data_dir: str | Path | None = None,
                  cache_dir: str | Path = DEFAULT_CACHE, seed: int = 0) -> list[Example]:
    """Examples of ``split`` (train/dev/test) from ``data``: synthetic, e2e (CSV), txt, hf, or a file path."""
    data_dir = Path(data_dir) if data_dir else None
    if data == "synthetic":
        return synthetic_examples(split, seed)
    if data == "e2e":
        return read_csv(official_csv(split, data_dir, Path(cache_dir)))
    if data == "txt":
        path = (data_dir or Path(".")) / TXT_FILES[split]
        if not path.is_file():
            raise DataError(f"{path} not found: put the LoRA paper's {TXT_FILES[split]} into --data-dir")
        return read_txt(path)
    if data == "hf":
        return read_hf(split)
    path = Path(data)
    if path.suffix in (".csv", ".txt") and path.is_file():
        return read_csv(path) if path.suffix == ".csv" else read_txt(path)
    raise DataError(f"--data must be synthetic, e2e, txt, hf or an existing .csv/.txt file, got {data!r}")


# ------------------------------------------------------------------------------------------- synthetic

NAMES = ("The Copper Kettle", "Blue Heron", "The Old Mill", "Green Lantern", "The Red Fox", "Golden Spoon",
         "The Anchor", "Silver Birch", "The Olive Tree", "Moonlight", "The Brass Bell", "Cedar House",
         "The Wild Goose", "Harbour Lights", "The Lemon Grove", "Stone Bridge", "The Crown", "Maple Leaf",
         "The Pepper Pot", "Riverside Rose")
VALUES = {
    "eatType": ("restaurant", "coffee shop", "pub"),
    "food": ("English", "French", "Italian", "Chinese", "Indian", "Japanese", "Fast food"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
}
# Predicates (after a subject) for each slot, several phrasings each; {v} is the value.
PHRASES = {
    "eatType": ("is a {v}", "is a {v} venue", "operates as a {v}"),
    "food": ("serves {f}", "offers {f}", "has {f} on the menu"),
    "priceRange": ("has a {v} price range", "is in the {v} price range", "has prices in the {v} range"),
    "customer rating": ("has a {v} customer rating", "is rated {v} by customers", "has a customer rating of {v}"),
    "area": ("is in the {v}", "is located in the {v}", "can be found in the {v}"),
    "familyFriendly": {"yes": ("is family-friendly", "is kid friendly", "welcomes families"),
                       "no": ("is not family-friendly", "is not kid friendly", "does not welcome children")},
    "near": ("is near {v}", "is located near {v}", "is close to {v}"),
}
SYNTHETIC_SIZES = {"train": 800, "dev": 100, "test": 100}
SYNTHETIC_SPLIT_SEEDS = {"train": 0, "dev": 1, "test": 2}


def synthetic_mr(rng: random.Random) -> MR:
    """A random MR over the eight E2E slots: always a name, each other slot with probability 1/2."""
    name = rng.choice(NAMES)
    pairs = [("name", name)]
    for slot in SLOTS[1:]:
        if rng.random() < 0.5:
            value = rng.choice([n for n in NAMES if n != name]) if slot == "near" else rng.choice(VALUES[slot])
            pairs.append((slot, value))
    return tuple(pairs)


def _phrase(slot: str, value: str, rng: random.Random) -> str:
    options = PHRASES[slot][value] if slot == "familyFriendly" else PHRASES[slot]
    food = value.lower() if value.lower().endswith("food") else f"{value} food"
    return rng.choice(options).format(v=value, f=food)


def _join(predicates: Sequence[str]) -> str:
    return predicates[0] if len(predicates) == 1 else ", ".join(predicates[:-1]) + " and " + predicates[-1]


def realise(mr: MR, rng: random.Random) -> str:
    """One reference text for ``mr`` from the templates (random order and phrasing)."""
    values = dict(mr)
    predicates = [_phrase(slot, value, rng) for slot, value in mr if slot != "name"]
    rng.shuffle(predicates)
    name = values["name"]
    if not predicates:
        return f"There is a place called {name}."
    if "eatType" in values and rng.random() < 0.3:
        rest = [p for p in predicates if not p.startswith(("is a ", "operates as"))]
        opener = f"There is a {values['eatType']} called {name}"
        return f"{opener} that {_join(rest)}." if rest else f"{opener}."
    if len(predicates) >= 3 and rng.random() < 0.5:
        cut = len(predicates) // 2
        return f"{name} {_join(predicates[:cut])}. It {_join(predicates[cut:])}."
    return f"{name} {_join(predicates)}."


def synthetic_examples(split: str, seed: int = 0, refs_per_mr: int = 4) -> list[Example]:
    """The synthetic E2E-style split: distinct random MRs, ``refs_per_mr`` phrasings each, seeded."""
    rng = random.Random(f"e2e-synthetic-{seed}-{SYNTHETIC_SPLIT_SEEDS[split]}")
    mrs: dict[MR, None] = {}
    while len(mrs) < SYNTHETIC_SIZES[split]:
        mrs.setdefault(synthetic_mr(rng))
    return [Example(mr, realise(mr, rng)) for mr in mrs for _ in range(refs_per_mr)]


# ---------------------------------------------------------------------------------------------- prompts

def prompt(mr: MR) -> str:
    """The LoRA paper's linearisation of an MR: ``name : X | Type : Y | ...`` (its .txt files' text before ``||``)."""
    return " | ".join(f"{PROMPT_SLOT_NAMES[slot]} : {value}" for slot, value in mr)


def prompt_ids(tokenizer, mr: MR) -> list[int]:
    """The paper's model input before the text (gpt2_encode.py --add_bos): the MR's tokens, then end-of-text."""
    return tokenizer(prompt(mr))["input_ids"] + [tokenizer.eos_token_id]


def completion_ids(tokenizer, ref: str) -> list[int]:
    """The paper's training target after the prompt (--add_eos): the tokens of " " + reference, then end-of-text."""
    return tokenizer(" " + ref.strip())["input_ids"] + [tokenizer.eos_token_id]


def encode(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion, cut to their first ``max_length``, and labels that are -100 on the prompt
    (the loss is on the completion and its end-of-text only, as the paper's mask)."""
    prompt_part, target = prompt_ids(tokenizer, example.mr), completion_ids(tokenizer, example.ref)
    return (prompt_part + target)[:max_length], ([-100] * len(prompt_part) + target)[:max_length]


# ------------------------------------------------------------------------------------ tokenizer, model

def plain_transformers_progress() -> None:
    """No transformers bars ("Loading weights", "Writing model shards") when stderr is a file or a pipe."""
    if not sys.stderr.isatty():
        from transformers.utils import logging

        logging.disable_progress_bar()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained offline on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)


def tiny_model(vocab_size: int, eos_id: int, seed: int = 0, n_positions: int = 512):
    """A small random GPT-2 (4 layers, width 128, 4 heads, no dropout) for offline runs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    plain_transformers_progress()
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=128, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def load_tokenizer(name_or_path: str):
    """The tokenizer saved with a model (or a hub name), with padding set to end-of-text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype=None):
    """A GPT2LMHeadModel from a hub name (gpt2, gpt2-medium, gpt2-large) or a saved directory, without dropout.

    The LoRA paper's GPT-2 (its model.py) has no dropout outside the LoRA layers; transformers' GPT-2 configs carry
    0.1 on the residual, embedding and attention paths, which are set to 0 here.
    """
    from transformers import GPT2LMHeadModel

    plain_transformers_progress()
    return GPT2LMHeadModel.from_pretrained(name_or_path, dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


class LineProgress:
    """A progress report for logs and pipes: a plain line at every tenth of the way and at the end (tqdm's bar
    there would be one long line of carriage returns)."""

    def __init__(self, iterable=None, desc: str = "", total: int | None = None, initial: int = 0,
                 quiet: bool = False) -> None:
        self.iterable, self.desc, self.n, self.postfix, self.quiet = iterable, desc, initial, "", quiet
        self.total = len(iterable) if total is None and iterable is not None else total
        self.shown = self.n * 10 // self.total if self.total else 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        tenth = self.n * 10 // self.total if self.total else 0
        if tenth > self.shown and not self.quiet:
            self.shown = tenth
            print(f"{self.desc}: {self.n}/{self.total}{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def close(self) -> None:
        pass


def progress(iterable=None, desc: str = "", total: int | None = None, initial: int = 0, disable: bool = False):
    """A tqdm bar on a terminal, plain lines (LineProgress) when stderr is a file or a pipe, nothing if disabled."""
    if disable or not sys.stderr.isatty():
        return LineProgress(iterable, desc, total, initial, quiet=disable)
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial)


def read_json(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)



