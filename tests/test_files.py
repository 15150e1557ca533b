"""imtune.files is the one way imtune writes: a scan of src/imtune for any other write, move or delete (with the few
places that must differ listed, each with its reason), and the rules themselves: ownership by marker, inputs never
written over, no write through a link, a failed claim leaves nothing behind."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from imtune import files
from imtune.types import UsageError

SRC = Path(__file__).resolve().parents[1] / "src" / "imtune"

# Calls that write, move or delete files: methods (Path.write_text, fig.savefig, ...), module functions, and names.
METHODS = {"write_text", "write_bytes", "savefig", "save_pretrained", "mkdir", "rmdir", "unlink", "symlink_to",
           "hardlink_to", "touch", "rename", "replace_file"}
FUNCTIONS = {"json.dump", "np.save", "np.savez", "np.savez_compressed", "numpy.save", "torch.save", "shutil.copy",
             "shutil.copy2", "shutil.copyfile", "shutil.copytree", "shutil.move", "shutil.rmtree", "os.replace",
             "os.rename", "os.remove", "os.unlink", "os.symlink", "os.link", "os.mkdir", "os.makedirs", "os.rmdir",
             "os.truncate", "tempfile.mkstemp", "tempfile.mkdtemp", "tempfile.NamedTemporaryFile", "sqlite3.connect",
             "yaml.dump", "yaml.safe_dump", "SummaryWriter", "save_file"}
OPENERS = {"open", "os.fdopen", "gzip.open", "io.open"}  # writers when their mode has w, a, x or +
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
MODULES = ("os", "shutil", "json", "np", "numpy", "torch", "tempfile", "sqlite3", "yaml", "gzip", "io")

# The few places that must differ: (file under src/imtune, call) -> why it is safe.
ALLOWED = {
    # imtune.files itself: the one writer.
    **{("files.py", c): "the one writer" for c in (
        ".mkdir", ".savefig", "os.replace", "shutil.rmtree", ".unlink", "os.mkdir", "tempfile.mkstemp", "os.fdopen",
        "tempfile.mkdtemp", ".rmdir")},
    # Libraries that write by themselves, into a directory files.fresh_dir / files.temp_dir has just made (new,
    # empty, no link inside), which is then renamed into place whole (integrity.publish / files.rename):
    ("rundir/checkpoint.py", ".save_pretrained"): "into files.fresh_dir(RUN/.tmp-...), published whole",
    ("model/models.py", ".save_pretrained"): "into files.temp_dir (mkdtemp) in the cache, renamed whole",
    # ... or into a file object files.replacing opened (a temporary file, renamed over the target when done):
    ("rundir/checkpoint.py", "torch.save"): "into files.fresh_dir(RUN/checkpoints/.tmp-step-N), published whole",
    ("data/cache.py", "np.savez"): "into the file object of files.replacing",
    # SQLite and TensorBoard open their own files; the path is checked right before (files.check_target /
    # files.make_dirs), a link refused:
    ("evaluate/judge.py", "sqlite3.connect"): "the judge cache file, files.check_target first",
    ("rundir/log.py", "SummaryWriter"): "RUN/tensorboard made by files.make_dirs just before",
    # Not files: the pipes between the sandbox's two processes.
    ("tasks/inside.py", "os.fdopen"): "pipe descriptors, not files",
    # Not a file: the kernel's control that resets this process's peak RSS (imtune.train.clock).
    ("train/clock.py", "os.open"): "/proc/self/clear_refs, a kernel control, not a file",
}


def _name(func: ast.expr) -> str:
    """`open`, `os.replace`, `.write_text` (a method: a dot and its name), "" for imtune.files' own functions."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and func.value.id in MODULES:
            return f"{func.value.id}.{func.attr}"
        if isinstance(func.value, ast.Name) and func.value.id in ("files", "fs"):
            return ""  # imtune.files.write_text & co.: the one writer
        return f".{func.attr}"
    return ""


def _writes(call: ast.Call, name: str) -> bool:
    if name.startswith(".") and name[1:] in METHODS or name in FUNCTIONS:
        return name not in ("yaml.dump", "yaml.safe_dump") or len(call.args) > 1  # with a stream: it writes
    if name in OPENERS or name == ".open":
        mode = call.args[1 if name != ".open" else 0] if len(call.args) > (name != ".open") else \
            next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
    if name == "os.open":
        return any(isinstance(n, ast.Attribute) and n.attr in WRITE_FLAGS for n in ast.walk(call))
    return False


def write_calls() -> list[tuple[str, str, int]]:
    """(file, call, line) of every call in src/imtune that writes, moves or deletes a file."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _writes(node, _name(node.func)):
                found.append((rel, _name(node.func), node.lineno))
    return found


def test_every_write_goes_through_imtune_files():
    calls = write_calls()
    stray = [f"src/imtune/{f}:{line}: {c}(...)" for f, c, line in calls if (f, c) not in ALLOWED]
    assert not stray, "write outside imtune.files (use it, or add the place to ALLOWED with why):\n" + "\n".join(stray)
    unused = sorted(set(ALLOWED) - {(f, c) for f, c, _ in calls})
    assert not unused, f"ALLOWED lists places that no longer write: {unused}"


def test_the_scan_sees_the_writes_it_is_meant_to_see(tmp_path):
    code = ("open(p, 'w')\nopen(p)\nPath(p).write_text('x')\nos.replace(a, b)\nos.open(p, os.O_RDONLY)\n"
            "os.open(p, os.O_WRONLY | os.O_CREAT)\nfig.savefig(p)\nyaml.safe_dump(x)\nyaml.safe_dump(x, f)\n"
            "p.open('a')\nshutil.rmtree(d)\njson.dumps(x)\n")
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
    hits = sorted(node.lineno for node in calls if _writes(node, _name(node.func)))
    assert hits == [1, 3, 4, 6, 7, 9, 10, 11]
    assert not any(_writes(n, _name(n.func)) for n in ast.walk(ast.parse("files.write_text(p, 'x')\np.open()"))
                   if isinstance(n, ast.Call))


# -- ownership -------------------------------------------------------------------------------------------------------
def test_claim_makes_and_marks_a_new_directory_and_accepts_its_own(tmp_path):
    d = tmp_path / "a" / "b"
    assert files.claim(d, "compare") is True
    assert json.loads((d / files.MARKER).read_text()) == {"kind": "compare", "version": 1}
    (d / "report.md").write_text("x")
    assert files.claim(d, "compare") is False  # marked: it is imtune's
    assert files.claim(tmp_path / "empty-one", "run") and files.marker(tmp_path / "empty-one") == "run"
    with pytest.raises(UsageError, match="is an imtune compare directory, not a run directory"):
        files.claim(d, "run")


def test_a_user_folder_is_refused_saying_what_it_holds_and_is_left_as_it_was(tmp_path):
    mine = tmp_path / "project"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "train.jsonl").write_text("precious\n")
    (mine / "config.yaml").write_text("model: mine\n")  # a config.yaml proves nothing
    (mine / "metrics.jsonl").write_text("{}\n")
    before = _tree(mine)
    for kind in ("run", "compare", "sweep", "study", "demo", "eval", "plots"):
        with pytest.raises(UsageError, match=r"was not made by imtune \(no \.imtune marker; it holds config.yaml, "
                                             r"data, metrics.jsonl\).*echo"):
            files.claim(mine, kind)
    assert _tree(mine) == before


@pytest.mark.parametrize("where", [".", "home", "/", "parent"])
def test_the_working_directory_home_root_and_parents_are_never_claimed(where, tmp_path, monkeypatch):
    work = tmp_path / "w" / "x"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "w"))
    path = {".": Path("."), "home": tmp_path / "w", "/": Path("/"), "parent": Path("..")}[where]
    with pytest.raises(UsageError, match="root directory|home directory|working directory"):
        files.claim(path, "compare")
    assert not (work / files.MARKER).exists() and not (tmp_path / "w" / files.MARKER).exists()


def test_older_imtune_directories_are_accepted_by_what_only_imtune_writes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "data_stats.json", "chat_template.jinja", ".lock", "metrics.jsonl"):
        (run / name).write_text("x")
    assert files.claim(run, "run") is False and files.marker(run) == "run"
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    (cmp / "compare.json").write_text(json.dumps({"arms": [], "settings": {}, "commands": []}))
    assert files.owned(cmp, "compare") == cmp and files.marker(cmp) is None  # accepted; owned() writes nothing
    half = tmp_path / "half"  # a run directory without .lock: not provably imtune's
    half.mkdir()
    for name in ("config.yaml", "data_stats.json", "chat_template.jinja"):
        (half / name).write_text("x")
    with pytest.raises(UsageError, match="not made by imtune"):
        files.claim(half, "run")


def test_claiming_removes_what_it_created_when_the_command_fails_before_writing(tmp_path):
    d = tmp_path / "new" / "out"
    with pytest.raises(UsageError, match="bad"), files.claiming(d, "compare"):
        (d / "arms").mkdir()
        raise UsageError("bad argument")
    assert not (tmp_path / "new").exists()
    with pytest.raises(UsageError), files.claiming(d, "compare"):
        (d / "data.jsonl").write_text("written")
        raise UsageError("late")
    assert (d / "data.jsonl").exists()  # something was written: kept


def test_remove_owned_deletes_only_a_marked_directory(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x").write_text("x")
    with pytest.raises(UsageError, match="not made by `imtune demo`"):
        files.remove_owned(mine, "demo")
    files.claim(tmp_path / "demo", "demo")
    files.remove_owned(tmp_path / "demo", "demo")
    assert not (tmp_path / "demo").exists() and (mine / "x").exists()


# -- inputs and links ------------------------------------------------------------------------------------------------
def test_inputs_are_never_written_over_by_any_path_to_them(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("precious\n")
    (tmp_path / "alias").symlink_to(tmp_path)
    os.link(data, tmp_path / "hard.jsonl")
    with files.protecting(str(data), None, "hf:owner/name"):
        for target in (data, tmp_path / "alias" / "train.jsonl", tmp_path / "hard.jsonl"):
            with pytest.raises(UsageError, match="input of this command"):
                files.write_text(target, "gone")
    assert data.read_text() == "precious\n"
    files.write_text(data, "mine now")  # outside the command: an ordinary file
    assert data.read_text() == "mine now"


def test_no_write_follows_a_link_in_an_imtune_directory(tmp_path):
    run = tmp_path / "run"
    files.claim(run, "run")
    victim = tmp_path / "victim"
    victim.write_text("safe\n")
    (run / "metrics.jsonl").symlink_to(victim)
    (run / "eval").symlink_to(tmp_path)
    (run / "report.md").symlink_to(victim)
    for write in (lambda: files.open_append(run / "metrics.jsonl", run),
                  lambda: files.write_text(run / "report.md", "x", run),
                  lambda: files.write_json(run / "eval" / "victim", {}, run),
                  lambda: files.make_dirs(run / "eval" / "sub", run),
                  lambda: files.remove(run / "eval" / "victim", run),
                  lambda: files.write_text(run / ".." / "victim", "x", run)):
        with pytest.raises(UsageError, match="symbolic link|not a path inside"):
            write()
    assert victim.read_text() == "safe\n"
    with pytest.raises(UsageError, match="symbolic link"):
        files.owned(run, "run")


def test_writes_are_whole_and_keep_the_usual_permissions(tmp_path):
    p = files.write_json(tmp_path / "d" / "x.json", {"a": 1}, root=tmp_path)
    assert json.loads(p.read_text()) == {"a": 1} and oct(p.stat().st_mode & 0o777) == oct(0o666 & ~files._UMASK)
    with pytest.raises(RuntimeError), files.replacing(p, tmp_path) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert json.loads(p.read_text()) == {"a": 1} and sorted(os.listdir(tmp_path / "d")) == ["x.json"]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory): to check nothing changed."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}
