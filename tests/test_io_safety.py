"""Saving never loses the previous adapter (faults at every write, a full disk, SIGKILL at random moments);
loads check the config, the slices metadata and the tensors against each other; adapter names are checked
before anything changes."""

import errno
import functools
import json
import os
import pathlib
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
import fastlora.atomic
import fastlora.io
from fastlora import LoraConfig, LoRALinear
from fastlora.atomic import atomic_file, recover_dir, write_atomic

TARGETS = ["0", "1", "2"]


def base(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in TARGETS))


def version(index: int, width: int = 32, names=("default",), times: int = 1) -> nn.Module:
    """Two distinguishable adapter versions on one base model: 0 is r=4, alpha 64; 1 is r=8, alpha 8
    (ranks ``times`` that)."""
    model = base(width)
    r, alpha = (4 * times, 64) if index == 0 else (8 * times, 8)
    for name in names:
        fastlora.inject(model, LoraConfig(r=r, alpha=alpha, target_modules=TARGETS), adapter_name=name)
    gen = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=gen))
    return model


def same_adapter(a: nn.Module, b: nn.Module, name: str) -> bool:
    layers_a, layers_b = dict(fastlora.model.lora_layers(a)), dict(fastlora.model.lora_layers(b))
    return layers_a.keys() == layers_b.keys() and all(
        torch.equal(layers_a[n].adapter(name).lora_A, layers_b[n].adapter(name).lora_A)
        and torch.equal(layers_a[n].adapter(name).lora_B, layers_b[n].adapter(name).lora_B)
        and layers_a[n].adapter(name).scale == layers_b[n].adapter(name).scale for n in layers_a)


def which_version(folder, versions, name: str = "default", width: int = 32) -> int:
    """The index of the version ``folder`` holds, exactly; fails if it holds neither."""
    loaded = fastlora.load_adapter(base(width), folder, name=name)
    found = [i for i, v in enumerate(versions) if same_adapter(loaded, v, name)]
    assert len(found) == 1, f"{folder} holds neither version of adapter {name!r}"
    return found[0]


def leftovers(parent: pathlib.Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".fastlora-")]


class Faults:
    """Counts the calls that write to disk during a save, and fails call number ``at`` with ENOSPC (before the
    call, or after it has done its work)."""

    WRITES = ((os, "mkdir"), (os, "rename"), (os, "replace"), (os, "link"), (os, "symlink"), (os, "fsync"),
              (os, "chmod"), (fastlora.atomic, "_exchange"), (fastlora.io, "save_file"), (pathlib.Path, "write_text"))

    def __init__(self, monkeypatch, at: int | None = None, after: bool = False):
        self.calls, self.at, self.after, self.log = 0, at, after, []
        for owner, name in self.WRITES:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, function):
        @functools.wraps(function)
        def write(*args, **kwargs):
            hit, self.calls = self.calls == self.at, self.calls + 1
            self.log.append((function.__name__, args))
            if hit and not self.after:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            result = function(*args, **kwargs)
            if hit:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return result
        return write


def no_exchange(monkeypatch):
    """The fallback for file systems without renameat2(RENAME_EXCHANGE): two renames."""
    def unsupported(a, b):
        raise OSError(errno.EINVAL, "not supported (test)")
    monkeypatch.setattr(fastlora.atomic, "_exchange", unsupported)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("names", [("default",), ("default", "b")], ids=["one-adapter", "peft-layout"])
def test_a_fault_at_any_write_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, exchange, names):
    versions = [version(0, names=names), version(1, names=names)]
    folder = tmp_path / "adapter"
    (tmp_path / "adapter").mkdir()
    (folder / "README.md").write_text("the user's notes")
    if not exchange:
        no_exchange(monkeypatch)
    with monkeypatch.context() as counting:
        counter = Faults(counting)
        fastlora.save_adapter(versions[0], folder)
    assert counter.calls >= 8
    swap = next(i for i, (name, args) in enumerate(counter.log)  # the call that puts the new folder in place
                if (name == "_exchange" and exchange) or (name == "rename" and pathlib.Path(args[1]) == folder))
    outcomes = set()
    for at in range(counter.calls):
        for after in (False, True):
            fastlora.save_adapter(versions[0], folder)
            with monkeypatch.context() as faulty:
                Faults(faulty, at, after)
                try:
                    fastlora.save_adapter(versions[1], folder)
                    failed = False
                except OSError as error:
                    assert error.errno == errno.ENOSPC
                    failed = True
            found = {which_version(folder if n == "default" else folder / n, versions, n) for n in names}
            assert len(found) == 1, f"fault at write {at} (after={after}): the adapters are of different versions"
            if failed and found == {1}:
                assert at > swap or (at == swap and after), f"fault at write {at}: a failed save left the new version"
            outcomes |= found
            assert (folder / "README.md").read_text() == "the user's notes"
            assert leftovers(tmp_path) == []
    assert outcomes == {0, 1}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_sigkill_at_random_moments_leaves_exactly_one_whole_version(tmp_path, exchange):
    """A child process saves two versions of a ~1.5 MB adapter in turn (about 30 ms a save here) and is killed at random
    moments. (The two-rename window is too short for a kill to hit: the next test makes that state.)"""
    versions = [version(0, width=512, times=16), version(1, width=512, times=16)]
    folder = tmp_path / "adapter"
    fastlora.save_adapter(versions[0], folder)
    rng, saves, deadline = random.Random(0), 0, time.monotonic() + 3.0
    for kill in range(8):
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save in a loop until killed, one byte down the pipe per completed save
            try:
                if not exchange:
                    fastlora.atomic._exchange = lambda a, b: (_ for _ in ()).throw(OSError(errno.EINVAL, "test"))
                for i in range(10**6):
                    fastlora.save_adapter(versions[(i + 1) % 2], folder)
                    os.write(done_w, b".")
            finally:
                os._exit(1)
        os.close(done_w)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the saving child stopped before it was killed"
        saves += len(os.read(done_r, 1 << 16))
        os.close(done_r)
        which_version(folder, versions, width=512)  # load recovers an interrupted swap first
        assert leftovers(tmp_path) == [], f"kill {kill}: what the killed save left beside the folder was not removed"
        if time.monotonic() > deadline:
            break
    assert saves > 0, "the child never completed a save: the kills tested nothing"


def test_an_interrupted_two_rename_swap_is_recovered_to_the_new_version(tmp_path, monkeypatch):
    """The state a kill between the two renames leaves: the folder missing, both versions beside it."""
    versions = [version(0), version(1)]
    folder = tmp_path / "adapter"
    fastlora.save_adapter(versions[0], folder)
    no_exchange(monkeypatch)
    real_rename = os.rename

    def killed_before_the_second_rename(source, destination):
        if pathlib.Path(destination) == folder:
            raise KeyboardInterrupt  # no clean-up runs past this point for a real kill; see below
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", killed_before_the_second_rename)
    monkeypatch.setattr(fastlora.atomic.shutil, "rmtree", lambda *a, **k: None)  # a kill runs no clean-up
    with pytest.raises(KeyboardInterrupt):
        fastlora.save_adapter(versions[1], folder)
    monkeypatch.undo()
    # the rollback rename failed too (same patch), so the state is what a kill leaves
    assert not folder.exists() and len(leftovers(tmp_path)) == 2
    assert which_version(folder, versions) == 1
    assert [name.split("-")[2] for name in leftovers(tmp_path)] == ["old"]  # removed once this process is gone


def test_saving_keeps_other_files_and_adapters_in_the_folder_and_follows_a_symlink(tmp_path):
    two = version(0, names=("default", "b"))
    real = tmp_path / "real"
    fastlora.save_adapter(two, real)
    (real / "notes").mkdir()
    (real / "notes" / "run.txt").write_text("kept")
    (real / "b" / "extra.txt").write_text("also kept")
    (tmp_path / "link").symlink_to(real)
    fastlora.save_adapter(version(1), tmp_path / "link", name="default")
    assert (tmp_path / "link").is_symlink()
    assert which_version(real, [version(0), version(1)]) == 1
    assert which_version(real / "b", [two], "b") == 0
    assert (real / "notes" / "run.txt").read_text() == "kept" and (real / "b" / "extra.txt").read_text() == "also kept"


def test_a_long_adapter_name_saves_and_loads(tmp_path):
    name = "n" * 200
    model = version(0)
    fastlora.inject(model, LoraConfig(r=2, target_modules=TARGETS), adapter_name=name)
    fastlora.save_adapter(model, tmp_path / ("d" * 255))
    assert (tmp_path / ("d" * 255) / name / "adapter_model.safetensors").is_file()
    fastlora.load_adapter(base(), tmp_path / ("d" * 255) / name, name=name)


def test_atomic_file_writes_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "scores.json"
    write_atomic(path, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError, match="full"), atomic_file(path) as temp:
        temp.write_text("new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_recover_dir_leaves_a_live_save_alone(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    live = fastlora.atomic._aside(folder, "new", fastlora.atomic._token())  # this process: still saving
    live.mkdir()
    recover_dir(folder)
    assert live.is_dir()


# -- loads check that the files agree --------------------------------------------------------------------------

def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types and state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def rewrite(folder, change_config=None, change_tensors=None, metadata=None):
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    if change_config:
        change_config(config)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata=metadata)
    (folder / "adapter_config.json").write_text(json.dumps(config))


KEY = "base_model.model.1.lora_A.weight"


def set_(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize(("config", "tensors", "metadata", "message"), [
    (set_("r", 4), None, None, r"adapter_config.json gives '0' rank 4 \(r=4\) but adapter_model.safetensors holds "
                               r"rank 8"),
    (set_("rank_pattern", {"1": 2}), None, None, r"gives '1' rank 2 \(its rank_pattern\)"),
    (set_("rank_pattern", {"1": "8"}), None, None, r"rank_pattern\['1'\] must be an integer >= 1, got '8'"),
    (set_("alpha_pattern", {"1": float("nan")}), None, None, r"alpha_pattern\['1'\] must be a finite number > 0"),
    (set_("target_modules", ["0", "2"]), None, None, r"target_modules \['0', '2'\] do not select \['1'\]"),
    (None, lambda t: [t.pop(KEY), t.pop(KEY.replace("lora_A", "lora_B"))], None, r"select \['1'\].*no weights for"),
    (None, set_(KEY, torch.ones(8, 32, dtype=torch.int32)), None, r"lora_A.weight is torch.int32"),
    (None, set_(KEY, torch.full((8, 32), float("inf"))), None, r"1.lora_A.weight holds NaN or infinite"),
    (None, None, {"fastlora_slices": '{"1": [true, false, true]}'},
     r"(cannot be split into|records) slices \[True, False, True\]"),
    (None, None, {"fastlora_slices": '{"7": [true]}'}, r"names '7', which has no weights"),
    (None, None, {"fastlora_slices": '{"1": [1, 0]}'}, r"must be a list of booleans"),
    (None, None, {"fastlora_slices": '[]'}, r"'fastlora_slices' must be an object"),
], ids=["r", "rank_pattern", "rank_pattern-type", "alpha_pattern", "targets", "targets-without-weights", "dtype",
        "inf", "slices-shape", "slices-module", "slices-type", "slices-json"])
def test_files_that_disagree_are_errors_naming_the_file_and_change_nothing(tmp_path, config, tensors, metadata,
                                                                          message):
    fastlora.save_adapter(version(1), tmp_path)
    rewrite(tmp_path, config, tensors, metadata)
    for model in (base(), version(1)):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=message) as error:
            fastlora.load_adapter(model, tmp_path)
        assert str(tmp_path) in str(error.value)
        assert_unchanged(model, snap)


def test_the_half_written_folder_of_the_issue_is_refused(tmp_path):
    """New r=8 weights beside the old r=4, alpha 64 config: refused, not loaded with a scale of neither."""
    fastlora.save_adapter(version(0), tmp_path / "old")
    fastlora.save_adapter(version(1), tmp_path / "new")
    (tmp_path / "new" / "adapter_config.json").write_text((tmp_path / "old" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"rank 4 .* rank 8 tensors"):
        fastlora.load_adapter(base(), tmp_path / "new")


def test_slices_metadata_that_disagrees_with_the_models_slices_is_an_error(tmp_path):
    model = fastlora.inject(base(), LoraConfig(r=2, target_modules=["1"], slices={"1": [True, True]}))
    fastlora.save_adapter(model, tmp_path)
    target = fastlora.inject(base(), LoraConfig(r=4, target_modules=["1"]))
    with pytest.raises(ValueError, match=r"records slices \[True, True\] for '1' but the model's adapter"):
        fastlora.load_adapter(target, tmp_path)


def test_loading_over_a_merged_adapter_is_an_error(tmp_path):
    fastlora.save_adapter(version(1), tmp_path)
    model = fastlora.merge(version(0))
    with pytest.raises(ValueError, match="merged into the base weight of '0': unmerge it"):
        fastlora.load_adapter(model, tmp_path)


# -- names ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "message"), [
    ("n" * 300, "is 300 bytes long"),
    ("a/b", r"without '\.'.*path separators.*contains \['/'\]"),
    ("a\\b", r"contains \['\\\\'\]"),
    ("..", r"contains \['\.'\]"),
    ("", "non-empty string"),
    ("x\0y", "control characters"),
    ("con", "reserved device name"),
    (" a", "leading/trailing spaces"),
    ("training", "attribute of torch's ModuleDict"),
    (3, "non-empty string, got 3"),
])
def test_bad_adapter_names_are_refused_before_anything_changes(tmp_path, name, message):
    model = version(0)
    snap = snapshot(model)
    for call in (lambda: fastlora.inject(model, LoraConfig(r=2, target_modules=TARGETS), adapter_name=name),
                 lambda: model[0].add_adapter(name),
                 lambda: LoRALinear(nn.Linear(4, 4), adapter_name=name)):
        with pytest.raises(ValueError, match=message):
            call()
        assert_unchanged(model, snap)
    fastlora.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=message):
        fastlora.load_adapter(model, tmp_path, name=name)
    assert_unchanged(model, snap)
