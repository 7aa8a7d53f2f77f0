"""Saving never loses the previous adapter (faults at every write, a full disk, SIGKILL at random moments, two
processes saving at once), works in place (a working directory inside the folder, a mount point, the folder's owner
and mode) and leaves exactly the model's adapters; loads check the config, the slices metadata and the tensors
against each other; adapter names are checked before anything changes."""

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
from fastlora.atomic import atomic_file, write_atomic

TARGETS = ["0", "1", "2"]
MANIFEST, LOCK = ".fastlora-manifest", ".fastlora-lock"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


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


def versions_held(folder, versions, names, width: int = 32) -> set[int]:
    """The versions of the adapters in peft's layout in ``folder``, the subfolders' loaded first (each load of a
    subfolder must finish an interrupted save of the folder above it)."""
    return {which_version(folder if n == "default" else folder / n, versions, n, width)
            for n in sorted(names, key=lambda n: n == "default")}


def leftovers(folder: pathlib.Path) -> list[str]:
    """What saves left in ``folder``, its subfolders and beside it, but for the lock file: temporary files, a
    manifest."""
    places = [folder.parent, folder, *(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())]
    return sorted(str(p) for place in places for p in place.iterdir() if p.name.startswith(".fastlora-")
                  and p.name != LOCK)


class Faults:
    """Counts the calls that write to disk during a save, and fails call number ``at`` with ENOSPC (before the
    call, or after it has done its work)."""

    WRITES = ((os, "mkdir"), (os, "rename"), (os, "replace"), (os, "unlink"), (os, "fsync"), (os, "chmod"),
              (fastlora.io, "save_file"), (pathlib.Path, "write_text"))

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


@pytest.mark.parametrize("names", [("default",), ("default", "b")], ids=["one-adapter", "peft-layout"])
def test_a_fault_at_any_write_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, names):
    versions = [version(0, names=names), version(1, names=names)]
    folder = tmp_path / "adapter"
    (tmp_path / "adapter").mkdir()
    (folder / "README.md").write_text("the user's notes")
    fastlora.save_adapter(versions[0], folder)
    with monkeypatch.context() as counting:
        counter = Faults(counting)
        fastlora.save_adapter(versions[1], folder)
    assert counter.calls >= 12
    commit = next(i for i, (name, args) in enumerate(counter.log)  # the manifest's rename
                  if name == "replace" and pathlib.Path(args[1]).name == MANIFEST)
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
            found = versions_held(folder, versions, names)
            assert len(found) == 1, f"fault at write {at} (after={after}): the adapters are of different versions"
            if failed and found == {1}:
                assert at > commit or (at == commit and after), f"fault at write {at}: a failed save left the new one"
            outcomes |= found
            assert (folder / "README.md").read_text() == "the user's notes"
            assert leftovers(folder) == [], f"fault at write {at} (after={after})"
    assert outcomes == {0, 1}


def saving_child(folder, models, done_w: int, seed: int) -> int:
    """Fork a process that saves ``models`` in turn into ``folder`` until killed, one byte down ``done_w`` per
    completed save; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(seed, 10**6):
                fastlora.save_adapter(models[i % len(models)], folder)
                os.write(done_w, b".")
        finally:
            os._exit(1)
    return pid


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "a saving child stopped before it was killed"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_random_moments_leaves_exactly_one_whole_version(tmp_path):
    """A child process saves two versions of two ~1.5 MB adapters (peft's layout) in turn (about 40 ms a save
    here) and is killed at random moments; each load of the folder then finishes or discards what it left."""
    names = ("default", "b")
    versions = [version(i, width=512, times=16, names=names) for i in (0, 1)]
    folder = tmp_path / "adapter"
    fastlora.save_adapter(versions[0], folder)
    rng, saves, deadline = random.Random(0), 0, time.monotonic() + 3.0
    for killed in range(8):
        done_r, done_w = os.pipe()
        pid = saving_child(folder, versions[::-1], done_w, seed=0)
        os.close(done_w)
        time.sleep(rng.uniform(0.0, 0.25))
        kill(pid)
        saves += len(os.read(done_r, 1 << 16))
        os.close(done_r)
        assert len(versions_held(folder, versions, names, width=512)) == 1, f"kill {killed}: a mix of versions"
        assert leftovers(folder) == [], f"kill {killed}: what the killed save left was not removed"
        if time.monotonic() > deadline:
            break
    assert saves > 0, "the child never completed a save: the kills tested nothing"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_two_processes_saving_at_once_and_a_reader_see_whole_versions(tmp_path):
    """Two children save different versions into one folder at once while this process loads it; every load
    sees one whole adapter, and after both are killed the folder holds one version."""
    names = ("default", "b")
    versions = [version(i, width=256, times=4, names=names) for i in (0, 1)]
    folder = tmp_path / "adapter"
    fastlora.save_adapter(versions[0], folder)
    done_r, done_w = os.pipe()
    children = [saving_child(folder, [versions[i]], done_w, seed=0) for i in (0, 1)]
    os.close(done_w)
    try:
        deadline, loads = time.monotonic() + 1.5, 0
        while time.monotonic() < deadline:
            for name in names:  # each load is of one whole adapter (the other may be of another save by then)
                which_version(folder if name == "default" else folder / name, versions, name, width=256)
                loads += 1
        time.sleep(random.Random(1).uniform(0.0, 0.05))
    finally:
        for pid in children:
            kill(pid)
    saves = len(os.read(done_r, 1 << 16))
    os.close(done_r)
    assert saves >= 2 and loads >= 2, (saves, loads)
    assert len(versions_held(folder, versions, names, width=256)) == 1
    assert leftovers(folder) == []


def test_a_manifest_left_by_a_kill_is_rolled_forward_by_load_adapter(tmp_path, monkeypatch):
    """The state of a kill after the commit point, once the first rename is done: the manifest, default's new
    weights beside its old config (what peft, which knows nothing of the manifest, would read now), b all old.
    Loading b (a subfolder: the manifest is in the folder above) finishes the save."""
    names = ("default", "b")
    versions = [version(0, names=names), version(1, names=names)]
    folder = tmp_path / "adapter"
    fastlora.save_adapter(versions[0], folder)
    real_replace, renames = os.replace, []

    def killed_after_the_first_rename(source, destination):
        if renames and renames[-1] != MANIFEST:
            raise KeyboardInterrupt  # a kill runs no clean-up at all; an interrupt runs the save's, which keeps it
        real_replace(source, destination)
        renames.append(pathlib.Path(destination).name)

    monkeypatch.setattr(os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        fastlora.save_adapter(versions[1], folder)
    monkeypatch.undo()
    assert renames == [MANIFEST, WEIGHTS] and (folder / MANIFEST).is_file()
    assert load_file(folder / WEIGHTS)[KEY].shape[0] == 8  # the new rank
    assert json.loads((folder / CONFIG).read_text())["r"] == 4  # the old config
    assert which_version(folder / "b", versions, "b") == 1
    assert not (folder / MANIFEST).exists() and leftovers(folder) == []
    assert which_version(folder, versions) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_files_of_a_save_killed_before_its_commit_are_removed(tmp_path):
    names = ("default", "b")
    versions = [version(0, names=names), version(1, names=names)]
    folder = tmp_path / "adapter"
    fastlora.save_adapter(versions[0], folder)
    pid = os.fork()
    if pid == 0:  # killed at its first fsync: every new file is written, nothing committed
        fastlora.atomic.fsync_file = lambda path: os.kill(os.getpid(), signal.SIGKILL)
        try:
            fastlora.save_adapter(versions[1], folder)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    left = leftovers(folder)
    assert len(left) == 4 and all(name.endswith(".tmp") for name in left), left  # two files for each adapter
    assert any("/b/" in name for name in left)
    assert versions_held(folder, versions, names) == {0}
    assert leftovers(folder) == []


def test_temporary_files_of_a_live_save_are_kept(tmp_path):
    fastlora.save_adapter(version(0), tmp_path)
    live = tmp_path / f".fastlora-{os.getppid()}-0123abcd.tmp"  # another process's, still running
    live.write_text("being written")
    ours = tmp_path / f".fastlora-{os.getpid()}-0123abcd.tmp"  # this process's, of no save in progress
    ours.write_text("abandoned")
    fastlora.load_adapter(base(), tmp_path)
    assert live.exists() and not ours.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_during_a_save_does_not_keep_the_folder_locked(tmp_path):
    """A child forked while a save holds the folder's lock (a DataLoader worker, say) does not hold it after."""
    fcntl = pytest.importorskip("fcntl")
    with fastlora.atomic.transaction(tmp_path) as changes:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        changes.write("notes.txt").write_text("saved")
    fd = os.open(tmp_path / LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        kill(pid)
    assert (tmp_path / "notes.txt").read_text() == "saved"


def test_a_manifest_that_names_paths_out_of_the_folder_is_refused(tmp_path):
    fastlora.save_adapter(version(0), tmp_path / "adapter")
    (tmp_path / "outside").write_text("keep")
    for manifest in ({"renames": [], "deletes": ["../outside"]}, {"renames": [[".fastlora-1-0123abcd.tmp", "/x"]],
                                                                  "deletes": []}, ["not", "a", "manifest"]):
        (tmp_path / "adapter" / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="is not a manifest of a fastlora save"):
            fastlora.load_adapter(base(), tmp_path / "adapter")
    assert (tmp_path / "outside").read_text() == "keep"


# -- saving in place -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cwd", [".", "logs"], ids=["save-into-cwd", "save-into-cwds-parent"])
def test_saving_where_the_process_stands_keeps_its_working_directory(tmp_path, cwd):
    folder = tmp_path / "out"
    fastlora.save_adapter(version(0, names=("default", "b")), folder)
    (folder / "logs").mkdir()
    here = (folder / cwd).resolve()
    start = os.getcwd()
    os.chdir(here)
    try:
        fastlora.save_adapter(version(1, names=("default", "b")), "." if cwd == "." else "..")
        assert os.getcwd() == str(here)
        pathlib.Path("after.txt").write_text("written after the save")  # a relative write, e.g. Trainer's logs
    finally:
        os.chdir(start)
    assert (here / "after.txt").read_text() == "written after the save"
    assert versions_held(folder, [version(0, names=("default", "b")), version(1, names=("default", "b"))],
                         ("default", "b")) == {1}


def test_saving_into_a_mount_point_changes_files_not_the_folder(tmp_path, monkeypatch):
    """A mount point (a container volume, a PVC's root) cannot be renamed or replaced: EBUSY."""
    folder = tmp_path / "volume"
    fastlora.save_adapter(version(0), folder)
    inode = folder.stat().st_ino

    def busy(function):
        def call(source, destination, *args, **kwargs):
            if folder in (pathlib.Path(os.path.realpath(source)), pathlib.Path(os.path.realpath(destination))):
                raise OSError(errno.EBUSY, "Device or resource busy (a mount point)", str(source))
            return function(source, destination, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "rename", busy(os.rename))
    monkeypatch.setattr(os, "replace", busy(os.replace))
    fastlora.save_adapter(version(1), folder)
    assert folder.stat().st_ino == inode
    assert which_version(folder, [version(0), version(1)]) == 1


def test_saving_keeps_the_modes_of_the_folder_and_its_files(tmp_path):
    folder = tmp_path / "adapter"
    fastlora.save_adapter(version(0), folder)
    modes = {folder: 0o750, folder / WEIGHTS: 0o640, folder / CONFIG: 0o600}  # none what a new file would get
    for path, mode in modes.items():
        path.chmod(mode)
    fastlora.save_adapter(version(1), folder)
    assert {path: path.stat().st_mode & 0o7777 for path in modes} == modes
    assert which_version(folder, [version(0), version(1)]) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give the folder away")
def test_saving_keeps_the_folders_owner(tmp_path):
    folder = tmp_path / "adapter"
    fastlora.save_adapter(version(0), folder)
    os.chown(folder, 4321, 8765)
    fastlora.save_adapter(version(1), folder)
    assert (folder.stat().st_uid, folder.stat().st_gid) == (4321, 8765)
    assert which_version(folder, [version(0), version(1)]) == 1


# -- a full save holds exactly the model's adapters ------------------------------------------------------------

def test_a_deleted_default_adapter_is_not_loaded_back_from_an_earlier_save(tmp_path):
    model = version(0, names=("default", "b"))
    fastlora.save_adapter(model, tmp_path)
    (tmp_path / "README.md").write_text("the user's notes")
    fastlora.delete_adapter(model, "default")
    fastlora.save_adapter(model, tmp_path)
    assert not (tmp_path / WEIGHTS).exists() and not (tmp_path / CONFIG).exists()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors"):
        fastlora.load_adapter(base(), tmp_path)
    assert which_version(tmp_path / "b", [model], "b") == 0
    assert (tmp_path / "README.md").read_text() == "the user's notes"


def test_a_deleted_adapter_leaves_its_subfolder_without_adapter_files(tmp_path):
    model = version(0, names=("default", "b", "c"))
    fastlora.save_adapter(model, tmp_path)
    (tmp_path / "c" / "notes.txt").write_text("kept")
    fastlora.delete_adapter(model, "c")
    fastlora.save_adapter(model, tmp_path)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["notes.txt"]
    assert versions_held(tmp_path, [model], ("default", "b")) == {0}


def test_a_full_save_removes_no_adapter_it_did_not_write_itself(tmp_path):
    """An adapter in a subfolder that no full save of this folder wrote there (a Trainer's checkpoint-N: a save
    into the subfolder itself) stays, and a save of one adapter by name removes nothing."""
    fastlora.save_adapter(version(0), tmp_path / "checkpoint-2")
    earlier = version(0, names=("default", "c"))
    fastlora.save_adapter(earlier, tmp_path)
    model = version(1, names=("b",))
    fastlora.save_adapter(model, tmp_path, name="b")  # into the folder itself, as in peft
    assert which_version(tmp_path / "c", [earlier], "c") == 0
    assert which_version(tmp_path, [model], "b") == 0
    fastlora.save_adapter(model, tmp_path)  # the model has no default and no c
    assert not (tmp_path / WEIGHTS).exists() and not (tmp_path / "c" / WEIGHTS).exists()
    assert which_version(tmp_path / "checkpoint-2", [version(0)]) == 0
    assert which_version(tmp_path / "b", [model], "b") == 0


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
