"""E2E example data: official CSV and LoRA .txt readers, malformed rows, offline errors, synthetic data, prompts."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "e2e"
spec = importlib.util.spec_from_file_location("e2e_common", ROOT / "examples" / "e2e" / "common.py")
common = sys.modules["e2e_common"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(common)

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"E2E data not found at {DATA}")


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def test_csv_reads_quoted_fields_crlf_and_consecutive_refs(tmp_path):
    path = write(tmp_path / "d.csv", 'mr,ref\n"name[A], area[city centre]","A is, in fact, central."\n'
                                     '"name[A], area[city centre]",A is central.\n"name[B]","B ""quoted"" here"\n',
                 newline="\r\n")
    examples = common.read_csv(path)
    assert [e.ref for e in examples] == ["A is, in fact, central.", "A is central.", 'B "quoted" here']
    groups = common.group_by_mr(examples)
    assert groups == [((("name", "A"), ("area", "city centre")), ["A is, in fact, central.", "A is central."]),
                      ((("name", "B"),), ['B "quoted" here'])]


@pytest.mark.parametrize(("row", "message"), [
    ('"name[A], food[Thai]"', "expected 2 fields"),
    ('"name[A], colour[red]",text', "unknown slot 'colour'"),
    ('"name[A] area[riverside]",text', "malformed meaning representation"),
    ('"name[A], area[riverside",text', "malformed meaning representation"),
])
def test_csv_malformed_row_names_file_and_line(tmp_path, row, message):
    path = write(tmp_path / "bad.csv", f'mr,ref\n"name[A]",fine\n"name[B]","two\nlines"\n{row}\n"name[C]",ok\n')
    with pytest.raises(common.DataError, match=rf"bad\.csv:5: .*{message}"):
        common.read_csv(path)


def test_csv_wrong_header_is_an_error(tmp_path):
    with pytest.raises(common.DataError, match=r"h\.csv:1: expected the header"):
        common.read_csv(write(tmp_path / "h.csv", "meaning,text\nx,y\n"))


def test_txt_reads_lora_format_and_maps_slot_names(tmp_path):
    path = write(tmp_path / "valid.txt", "name : The Eagle | Type : pub | family friendly : yes||It is a pub . \n\n"
                                         "name : B | price : cheap | customer rating : low||B is cheap .\n")
    examples = common.read_txt(path)
    assert examples[0].mr == (("name", "The Eagle"), ("eatType", "pub"), ("familyFriendly", "yes"))
    assert examples[0].ref == "It is a pub ."
    assert examples[1].mr == (("name", "B"), ("priceRange", "cheap"), ("customer rating", "low"))


@pytest.mark.parametrize(("line", "message"), [
    ("name : A | Type : pub|B is a pub .", "expected exactly one '\\|\\|'"),
    ("name : A | colour : red||A is red .", "malformed slot 'colour : red'"),
    ("name A||A .", "malformed slot 'name A'"),
])
def test_txt_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "t.txt", f"name : A||A .\n{line}\n")
    with pytest.raises(common.DataError, match=rf"t\.txt:2: {message}"):
        common.read_txt(path)


@needs_data
def test_official_files_parse_with_the_documented_counts():
    dev = common.read_csv(DATA / "devset.csv")
    test = common.read_csv(DATA / "testset_w_refs.csv")
    assert (len(dev), len(common.group_by_mr(dev))) == (4672, 547)
    assert (len(test), len(common.group_by_mr(test))) == (4693, 630)
    assert len(common.read_csv(DATA / "testset.csv")) == 630
    valid = common.read_txt(DATA / "lora-format" / "valid.txt")
    # the same MRs in the same order, slot names mapped back (values are tokenized there: "£ 20 - 25")
    assert [[slot for slot, _ in e.mr] for e in valid] == [[slot for slot, _ in e.mr] for e in dev]


@needs_data
def test_local_official_csv_is_verified_and_used(tmp_path):
    assert common.official_csv("dev", DATA, tmp_path / "cache") == DATA / "devset.csv"
    corrupt = write(tmp_path / "devset.csv", (DATA / "devset.csv").read_text(encoding="utf-8")[:-10])
    with pytest.raises(common.DataError, match=r"is not the official devset\.csv"):
        common.official_csv("dev", tmp_path, tmp_path / "cache")
    assert corrupt.exists()


def test_missing_files_offline_say_where_to_put_which_file(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "OFFICIAL_URL", "http://127.0.0.1:9/")  # nothing listens on port 9
    with pytest.raises(common.DataError) as error:
        common.load_examples("e2e", "train", tmp_path / "data", tmp_path / "cache")
    message = str(error.value)
    assert "trainset.csv" in message and str(tmp_path / "data") in message and "tuetschek/e2e-dataset" in message
    assert not (tmp_path / "cache" / "trainset.csv").exists()


@pytest.fixture
def serve(monkeypatch):
    """Serve a folder over HTTP on localhost as the download source; returns a function taking the folder."""
    servers = []

    def start(folder: Path) -> None:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        handler.log_message = lambda *args: None
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        monkeypatch.setattr(common, "OFFICIAL_URL", f"http://127.0.0.1:{server.server_port}/")

    yield start
    for server in servers:
        server.shutdown()


@needs_data
def test_download_verifies_then_caches(tmp_path, serve):
    serve(DATA)
    cache = tmp_path / "cache"
    assert common.official_csv("dev", tmp_path / "empty", cache) == cache / "devset.csv"
    assert common.sha256(cache / "devset.csv") == common.OFFICIAL_FILES["devset.csv"][1]
    assert len(common.load_examples("e2e", "dev", None, cache)) == 4672  # now from the cache


@needs_data
def test_corrupt_download_is_rejected_and_not_cached(tmp_path, serve):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "devset.csv").write_bytes((DATA / "devset.csv").read_bytes().replace(b"Alimentum", b"Alimentun"))
    serve(mirror)
    with pytest.raises(common.DataError, match=r"is not the official devset\.csv"):
        common.official_csv("dev", None, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_synthetic_data_is_seeded_varied_and_covers_all_slots():
    train = common.synthetic_examples("train")
    assert train == common.synthetic_examples("train")
    assert train != common.synthetic_examples("train", seed=1)
    groups = common.group_by_mr(train)
    assert len(groups) == common.SYNTHETIC_SIZES["train"]
    assert {slot for mr, _ in groups for slot, _ in mr} == set(common.SLOTS)
    assert sum(len(set(refs)) > 1 for _, refs in groups) > 0.9 * len(groups)  # several phrasings per MR
    test_mrs = {mr for mr, _ in common.group_by_mr(common.synthetic_examples("test"))}
    assert not test_mrs & {mr for mr, _ in groups}
    for mr, refs in groups[:50]:
        for ref in refs:  # every value is realised (food may be lower-cased)
            assert all(value.lower() in ref.lower() for slot, value in mr if slot != "familyFriendly")


class CharTokenizer:
    """A stand-in tokenizer: one id per character, end-of-text 0."""

    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_prompt_is_the_papers_mr_then_end_of_text_and_the_loss_masks_it():
    example = common.Example((("name", "A"), ("eatType", "pub"), ("familyFriendly", "no")), "A is a pub.")
    assert common.prompt(example.mr) == "name : A | Type : pub | family friendly : no"
    ids, labels = common.encode(CharTokenizer(), example, max_length=1000)
    n = len(common.prompt(example.mr)) + 1  # the MR's tokens, then end-of-text (gpt2_encode.py --add_bos)
    assert ids[n - 1] == 0 and labels[:n] == [-100] * n and labels[n:] == ids[n:]
    assert "".join(map(chr, ids[n:-1])) == " A is a pub." and ids[-1] == 0  # " " + reference, end-of-text
    short_ids, short_labels = common.encode(CharTokenizer(), example, max_length=n + 3)
    assert len(short_ids) == len(short_labels) == n + 3


@needs_data
def test_prompt_is_the_papers_context_text_for_every_mr_of_its_files():
    for name in ("valid.txt", "test.txt"):
        lines = (DATA / "lora-format" / name).read_text(encoding="utf-8").splitlines()
        contexts = [line.strip().split("||")[0] for line in lines if line.strip()]  # format_converting_e2e.py
        examples = common.read_txt(DATA / "lora-format" / name)
        assert [common.prompt(e.mr) for e in examples] == contexts
        assert [e.ref for e in examples] == [line.strip().split("||")[1] for line in lines if line.strip()]


def test_progress_off_a_terminal_is_plain_lines_at_every_tenth(capsys):
    assert list(common.progress(range(20), "gen")) == list(range(20))
    lines = capsys.readouterr().err
    assert "\r" not in lines and lines.splitlines() == [f"gen: {n}/20" for n in range(2, 21, 2)]
    bar = common.progress(total=5, initial=2, desc="train")
    for _ in range(3):
        bar.set_postfix(loss="1.5")
        bar.update()
    assert capsys.readouterr().err.splitlines() == [f"train: {n}/5, loss 1.5" for n in (3, 4, 5)]
    assert list(common.progress(range(3), "quiet", disable=True)) == [0, 1, 2] and capsys.readouterr().err == ""
