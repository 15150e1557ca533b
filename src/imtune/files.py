"""The one way imtune writes, moves or deletes a file, and the one answer to "is this directory imtune's?".

imtune runs in people's project folders with their data beside it, and reads run directories other people made.
So every write follows four rules, kept here and nowhere else (tests/test_files.py fails on a write elsewhere):

  1. Ownership. A directory is imtune's only when imtune marked it: `claim(DIR, kind)` creates DIR and writes
     DIR/.imtune ({"kind": "run"|"compare"|"sweep"|"study"|"demo"|"eval"|"plots", "version": 1}), or accepts a
     DIR that already holds that marker. An existing non-empty directory without it is refused, saying what it holds
     (a config.yaml proves nothing); so are `.`, the home directory, `/` and every ancestor of the working
     directory, and a DIR that is a symbolic link. `check_claim` says the same without writing (commands call it
     while validating their arguments); `claiming` removes what it created when the command fails before writing
     anything else. Directories an older imtune made have no marker; LEGACY accepts those whose files only imtune
     writes (a run: config.yaml, data_stats.json, chat_template.jinja and .lock; a comparison, sweep or study: its
     compare.json / sweep.json / study.json; a demo: .imtune-demo) and marks them; anything else is refused with
     the one line that marks it by hand.
  2. Inputs are never written over: inside `protecting(--data, --eval-data, --val-data ...)` a write whose target is
     one of them (the same path, or os.path.samefile) is refused.
  3. No write follows a link: the target, and every path component from the owned root down to it, must not be a
     symbolic link. Files are written whole to a temporary file in the same directory and os.replace'd over the
     target (a reader never sees half a file); appends open with O_NOFOLLOW|O_APPEND. `refuse_links(DIR)` is the
     read side: a run or comparison directory with a link among its entries is refused before it is read.
  4. Libraries that write by themselves (save_pretrained, torch.save, np.savez, SQLite, TensorBoard) write into a
     directory made fresh by `fresh_dir`/`temp_dir`, into a file object from `replacing`, or to a path checked
     right before; tests/test_files.py lists these few places with the reason for each.

    claim(DIR, kind) -> created?     check_claim(DIR, kind)      claiming(DIR, kind)       owned(DIR, kind)
    write_text / write_bytes / write_json / write_jsonl(PATH, ..., root=DIR)      replacing(PATH, root) as f
    open_append(PATH, root) -> text file       open_fd(PATH, flags, root) -> fd       save_figure(fig, PATH, root)
    make_dirs(PATH, root)    fresh_dir(PATH, root)    temp_dir(parent)    rename(A, B, root)    remove(PATH, root)
    remove_owned(DIR, kind)  refuse_links(DIR)        inside(DIR, relative) -> DIR/relative, never outside it
`root` is the imtune directory the path lies in (None: a file the user named, e.g. --json OUT: only it is checked).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from imtune.types import UsageError

MARKER = ".imtune"
KINDS = ("run", "compare", "sweep", "study", "demo", "eval", "plots")
ALSO = {"compare": ("demo",)}  # a demo directory is the comparison it runs
IGNORED = (MARKER, ".lock")  # what a claimed directory may hold and still be removed as unused
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_protected: list[tuple[str, tuple[int, int] | None]] = []


# -- ownership -------------------------------------------------------------------------------------------------------
def marker(path: str | Path) -> str | None:
    """The kind DIR/.imtune names (or "demo" for an older demo's .imtune-demo); None without a valid marker."""
    m = Path(path) / MARKER
    if m.is_symlink():
        raise UsageError(f"{m} is a symbolic link, not a marker imtune wrote; remove it")
    try:
        kind = json.loads(m.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        old = Path(path) / ".imtune-demo"
        return "demo" if old.is_file() and not old.is_symlink() else None
    return kind if kind in KINDS else None


def _json_has(path: Path, keys: tuple[str, ...]) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


def _plain(d: Path, *names: str) -> bool:
    return all((d / n).is_file() and not (d / n).is_symlink() for n in names)


# Directories an older imtune made, before the marker: only imtune writes these files together.
LEGACY = {
    "run": lambda d: _plain(d, "config.yaml", "data_stats.json", "chat_template.jinja", ".lock"),
    "compare": lambda d: _json_has(d / "compare.json", ("arms", "settings", "commands")),
    "sweep": lambda d: _json_has(d / "sweep.json", ("prompt_weights", "recommendation")),
    "study": lambda d: _json_has(d / "study.json", ("rows", "factor", "trend")),
}


def _special(path: Path) -> str | None:
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == Path(real.anchor):
        return "the root directory"
    if real == Path.home().resolve():
        return "the home directory"
    if real == cwd or real in cwd.parents:
        return "the working directory or one of its parents"
    return None


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(f".tmp-{MARKER}"))


def _not_ours(d: Path, kind: str, found: list[str]) -> UsageError:
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return UsageError(f"{d} exists and was not made by imtune (no {MARKER} marker; it holds {shown}): give a new or "
                      f"empty directory (if an older imtune made it: echo '{{\"kind\": \"{kind}\", \"version\": 1}}' "
                      f"> {d}/{MARKER})")


def check_claim(path: str | Path, kind: str) -> None:
    """Raise UsageError unless `claim(path, kind)` may write there; writes nothing."""
    p = Path(path)
    where = _special(p)
    if where:
        raise UsageError(f"{p} is {where}: imtune writes its {kind} directories only into a directory of their own; "
                         "give a new one")
    if p.is_symlink():
        raise UsageError(f"{p} is a symbolic link: give the directory it points to, or a new one")
    if not p.exists():
        return
    if not p.is_dir():
        raise UsageError(f"{p} exists and is a file, not a directory imtune made; give another directory")
    found = marker(p)
    if found is None and not LEGACY.get(kind, lambda d: False)(p) and _entries(p):
        raise _not_ours(p, kind, _entries(p))
    if found is not None and found not in (kind, *ALSO.get(kind, ())):
        raise UsageError(f"{p} is an imtune {found} directory, not a {kind} directory; give another one")
    refuse_links(p)


def claim(path: str | Path, kind: str) -> bool:
    """Make `path` an imtune `kind` directory (created and marked) or raise UsageError; True when created here."""
    p = Path(path)
    check_claim(p, kind)
    created = not p.exists()
    if marker(p) is None:
        make_dirs(p)
        write_json(p / MARKER, {"kind": kind, "version": 1}, root=p)
    return created


@contextmanager
def claiming(path: str | Path, kind: str, unused: Callable[[Path], bool] | None = None) -> Iterator[bool]:
    """claim(); when the body fails and the directory was created here with nothing but its marker (and lock) in it,
    it is removed again, with the parents created for it: a refused command leaves nothing behind. `unused(DIR)`:
    the command's own test that what it wrote so far is worth nothing (compare: a data split but no run that began
    training), for a directory that holds more than markers when it fails."""
    p = Path(path)
    top = first_missing(p)
    created = claim(p, kind)
    try:
        yield created
    except BaseException:
        if created:
            unclaim(p, top, unused)
        raise


def first_missing(path: str | Path) -> Path | None:
    """The outermost directory of `path` (itself included) that does not exist yet: what claim would create."""
    p = Path(path)
    return next((a for a in [*reversed(p.parents), p] if not a.exists()), None)


def unclaim(p: Path, top: Path | None, unused: Callable[[Path], bool] | None = None) -> None:
    """Remove `p` (created by claim) and its parents up to `top` when nothing but markers, locks and empty
    directories is in it (or `unused(p)` says what is in it is worth nothing): a command that failed before writing
    (before training) leaves no trace. Anything else stays."""
    p = Path(p)
    if p.is_symlink() or not p.is_dir():
        return
    files = [f for f in p.rglob("*") if not f.is_dir() or f.is_symlink()]
    if any(f.name not in IGNORED for f in files) and not (unused is not None and unused(p)):
        return
    shutil.rmtree(p, ignore_errors=True)
    for d in p.parents:
        if top is None or not d.is_relative_to(top) or d.is_symlink():
            break
        try:
            d.rmdir()
        except OSError:
            break


def owned(path: str | Path, kind: str) -> Path:
    """`path` when it is an imtune `kind` directory (marked, or LEGACY) without links among its entries; writes
    nothing. Else UsageError."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        raise UsageError(f"{p} is not a directory imtune made (a link, a file or missing)")
    found = marker(p)
    if found is None and not LEGACY.get(kind, lambda d: False)(p):
        raise _not_ours(p, kind, _entries(p) or ["nothing"])
    if found is not None and found not in (kind, *ALSO.get(kind, ())):
        raise UsageError(f"{p} is an imtune {found} directory, not a {kind} directory")
    refuse_links(p)
    return p


def remove_owned(path: str | Path, kind: str) -> None:
    """Delete `path` whole, only when imtune marked it as `kind` and it is no special place (see check_claim)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        raise UsageError(f"{p} is not a directory imtune made (a link or a file); not deleted")
    where = _special(p)
    if where:
        raise UsageError(f"refusing to delete {p} ({p.resolve()}): {where}")
    if marker(p) not in (kind, *ALSO.get(kind, ())):
        shown = ", ".join(_entries(p)[:5]) or "nothing"
        raise UsageError(f"{p} was not made by `imtune {kind}` (no {MARKER} marker of a {kind}; it holds {shown}); "
                         "not deleted. Give another directory, or delete it yourself")
    shutil.rmtree(p)


def refuse_links(d: str | Path, depth: int = 2) -> None:
    """UsageError when `d` or an entry of it (and of its subdirectories, `depth` levels) is a symbolic link: imtune
    makes none, so a directory with one came from elsewhere and could point a write anywhere."""
    d = Path(d)
    if d.is_symlink():
        raise UsageError(f"{d} is a symbolic link: imtune reads and writes its directories only as they are")
    if depth and d.is_dir():
        for p in d.iterdir():
            if p.is_symlink():
                raise UsageError(f"{p} is a symbolic link: imtune never follows one in a run or comparison "
                                 "directory (one received from elsewhere?); remove it")
            if depth > 1 and p.is_dir():
                refuse_links(p, depth - 1)


def inside(root: str | Path, rel: str) -> Path:
    """root/rel for a relative path read from a file (compare.json's run "dir"), refused when it leaves root."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise UsageError(f"{root}: {rel!r} is not a path inside it (a file edited by hand or from elsewhere?)")
    return Path(root) / p


# -- inputs ----------------------------------------------------------------------------------------------------------
@contextmanager
def protecting(*paths) -> Iterator[None]:
    """While inside: no write goes to any of `paths` (the command's --data, --eval-data, --val-data, ...)."""
    added = [(os.path.realpath(p), _identity(p)) for p in paths if p and not str(p).startswith("hf:")]
    _protected.extend(added)
    try:
        yield
    finally:
        for a in added:
            _protected.remove(a)


def _identity(p) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_input(path: Path) -> bool:
    real, ident = os.path.realpath(path), _identity(path)
    return any(real == r or (ident is not None and ident == i) for r, i in _protected)


# -- writes ----------------------------------------------------------------------------------------------------------
def check_target(path: str | Path, root: str | Path | None = None) -> Path:
    """`path`, when a write may go there: not a protected input, no link on the way from `root` (or, without root,
    the target itself not a link)."""
    path = Path(path)
    steps = [path]
    if root is not None:
        rel = path.relative_to(root).parts  # ValueError: a write outside its own directory is our bug
        if ".." in rel:
            raise UsageError(f"{path}: not a path inside {root}; imtune writes only inside its own directory")
        steps = [Path(root).joinpath(*rel[:i]) for i in range(len(rel) + 1)]
    for p in steps:
        if p.is_symlink():
            raise UsageError(f"{p} is a symbolic link: imtune never writes through one (a directory from "
                             "elsewhere?); remove it and run again")
    if _is_input(path):
        raise UsageError(f"{path} is an input of this command (--data, --eval-data or --val-data): imtune never "
                         "writes over it; choose another output")
    return path


def make_dirs(path: str | Path, root: str | Path | None = None) -> Path:
    """mkdir -p, refusing a link on the way from `root` down (without root: a directory the user named, as is)."""
    path = Path(path)
    if root is not None:
        check_target(path, root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def replacing(path: str | Path, root: str | Path | None = None, durable: bool = False) -> Iterator[io.BufferedWriter]:
    """A binary file object whose bytes replace `path` whole when the block ends without an error (a temporary file
    in the same directory, then os.replace; durable: fsync'ed first, and the directory after)."""
    path = check_target(path, root)
    make_dirs(path.parent, root)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        check_target(path, root)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes, root: str | Path | None = None, durable: bool = False) -> Path:
    with replacing(path, root, durable) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, root: str | Path | None = None, durable: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), root, durable)


def write_json(path: str | Path, obj, root: str | Path | None = None, indent: int | None = 1,
               durable: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", root, durable)


def write_jsonl(path: str | Path, rows, root: str | Path | None = None) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), root)


def save_figure(fig, path: str | Path, root: str | Path | None = None, dpi: int = 100) -> Path:
    """A matplotlib Figure as PNG, written like any other file (savefig itself would follow a link)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes(path, buf.getvalue(), root)


def open_fd(path: str | Path, flags: int, root: str | Path | None = None, mode: int = 0o666) -> int:
    """os.open with O_NOFOLLOW (and the checks of check_target): for locks, appends and logs."""
    return os.open(check_target(path, root), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def open_append(path: str | Path, root: str | Path | None = None):
    """A line-buffered UTF-8 text file appended to (created when absent; a link is refused)."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, root)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def rename(src: str | Path, dst: str | Path, root: str | Path | None = None) -> None:
    """os.replace(src, dst), both checked; a link at either end is refused, never renamed or followed."""
    os.replace(check_target(src, root), check_target(dst, root))


def remove(path: str | Path, root: str | Path | None = None) -> None:
    """Delete a file or directory tree of imtune's own (a link on the way is refused; absent: nothing to do)."""
    path = check_target(path, root)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fresh_dir(path: str | Path, root: str | Path) -> Path:
    """An empty directory at `path` (a leftover of an interrupted writer removed first), for a library to fill."""
    remove(path, root)
    make_dirs(Path(path).parent, root)
    os.mkdir(path)
    return Path(path)


def temp_dir(parent: str | Path | None = None, prefix: str = ".tmp-") -> Path:
    """A new private directory (mkdtemp) in `parent` (None: the system's temporary directory)."""
    if parent is not None:
        make_dirs(parent)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def temp_file(text: str, suffix: str) -> Path:
    """A new private file in the system's temporary directory holding `text` (e.g. a template for vLLM)."""
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="imtune-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(name)


def fsync_dir(d: str | Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """Where imtune keeps its caches: $IMTUNE_CACHE, else ~/.cache/imtune."""
    return Path(os.environ.get("IMTUNE_CACHE", Path.home() / ".cache" / "imtune"))
