"""A checkpoint directory is published whole and checked against its manifest before anything trusts it.

    publish(tmp, final, RUN) fsync every file and directory under tmp, then rename it into place (atomic)
    write_manifest(d)        COMPLETE: {"files": {name: {"bytes", "sha256"}}, "optimizer": why it is absent or None}
    verify(ckpt)             None when every listed file is there with its size and sha256, else what is wrong
    checkpoints(run_dir)     the complete ones (COMPLETE present), oldest first; newest_intact / last_good verify

imtune.rundir.checkpoint writes and reads checkpoints with these; a checkpoint is called "good" only when it
verifies."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from imtune import files
from imtune.files import fsync_dir
from imtune.types import UsageError

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = 1


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory (bottom-up), so a rename after it publishes whole files."""
    for dirpath, _, names in os.walk(root, topdown=False):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def publish(tmp: Path, final: Path, root: Path) -> None:
    """Atomically make `tmp` (a finished directory inside the run directory `root`) appear as `final`, replacing an
    older one (imtune.files refuses a link at either name)."""
    fsync_tree(tmp)
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        files.rename(final, old, root)
        files.rename(tmp, final, root)
        files.remove(old, root)
    else:
        files.rename(tmp, final, root)
    fsync_dir(final.parent)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out = []
    for d in (Path(run_dir) / "checkpoints").glob("step-*"):
        if (d / COMPLETE).exists() and d.name[5:].isdigit():
            out.append((int(d.name[5:]), d))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint marked complete (not verified: see newest_intact / last_good)."""
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


# -- integrity -------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(d: Path, optimizer_note: str | None = None) -> None:
    """COMPLETE = sizes and sha256 of every file in `d` (written last; `optimizer_note`: why optimizer.pt is absent)."""
    listed = {str(f.relative_to(d)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(d.rglob("*")) if f.is_file() and f.name != COMPLETE}
    body = {"format": MANIFEST_FORMAT, "files": listed, "optimizer": optimizer_note}
    files.write_json(d / COMPLETE, body, root=d)


def read_manifest(ckpt: Path) -> dict:
    """The manifest of a checkpoint; UsageError when it is absent or unreadable."""
    try:
        m = json.loads((Path(ckpt) / COMPLETE).read_text())
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            raise ValueError
    except FileNotFoundError:
        raise UsageError(f"{ckpt}: not a complete checkpoint (no {COMPLETE} marker); resume from another one") from None
    except (ValueError, OSError, UnicodeDecodeError):
        raise UsageError(f"{ckpt}: {COMPLETE} holds no readable manifest (damaged, or written by an imtune that did "
                         "not record checksums)") from None
    return m


def verify(ckpt: Path) -> str | None:
    """None when every file of the manifest is there with its size and sha256; else what is wrong, e.g.
    "optimizer.pt: missing", "model.safetensors: 1,024 bytes, expected 12,879,104 (truncated)"."""
    ckpt = Path(ckpt)
    try:
        listed = read_manifest(ckpt)["files"]
    except UsageError as e:
        return str(e).removeprefix(f"{ckpt}: ")
    if not listed:
        return f"{COMPLETE}: the manifest lists no files"
    for name, want in listed.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name}: missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            truncated = " (truncated)" if size < want["bytes"] else ""
            return f"{name}: {size:,} bytes, expected {want['bytes']:,}{truncated}"
        if sha256_file(f) != want["sha256"]:
            return f"{name}: checksum mismatch (the file changed after it was written)"
    return None


def newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies or None, [(newer damaged checkpoint, what is wrong)])."""
    damaged = []
    for _, d in reversed(checkpoints(run_dir)):
        problem = verify(d)
        if problem is None:
            return d, damaged
        damaged.append((d, problem))
    return None, damaged


def last_good(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies: the only one ever called "good"."""
    return newest_intact(run_dir)[0]
