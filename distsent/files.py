"""Crash-safe files: atomic writes, and folders sealed by a manifest of sizes and checksums, verified on read.

Every file distsent writes goes through here: a reader sees either the previous version or the complete new one,
never a half-written file (a kill, a lost node or a full disk in the middle of a write leaves only a temporary).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
EXIT_WRITE = 74  # exit status of a run that could not write its files (sysexits' EX_IOERR)


class IntegrityError(RuntimeError):
    """A sealed folder is incomplete or corrupted; the message names the file at fault."""

    exit_code = 2  # as distsent-train exits on it


class WriteError(OSError):
    """A file or folder could not be written (a full disk, no permission, ...); the message names it and why."""

    exit_code = EXIT_WRITE

    @classmethod
    def of(cls, path: str | Path, exc: OSError) -> "WriteError":
        if exc.errno is None and "requested and" in str(exc):  # numpy's short write: the disk filled up under it
            exc = OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {exc}")
        cause = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(_existing_parent(Path(path))).free
                cause += f" ({free / 2**20:.1f} MiB free there)"
        return cls(exc.errno, f"cannot write {path}: {cause}")

    def __str__(self) -> str:
        return self.strerror


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: str | Path, partial: Path | None = None):
    """Turn an OSError raised inside into a WriteError naming `path` and the cause, after removing `partial`
    (the temporary folder being filled), so that a failed write leaves nothing half-written behind."""
    try:
        yield
    except OSError as exc:
        error = exc if isinstance(exc, WriteError) else WriteError.of(path, exc)  # the free space as it failed
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if error is exc:
            raise
        raise error from exc


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary in the same folder and a rename (atomic on POSIX).
    WriteError if it cannot be written; the earlier version of `path`, if any, is then left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")  # its own, whatever its pid
    try:
        with writing(path), open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # nothing to remove, or a read-only filesystem (already reported)
            tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so that a rename inside it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path, **fields) -> dict:
    """Write the folder's manifest last: size and sha256 of every other file, plus `fields`. Returns it."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    for p in files:
        fsync_path(p)
    manifest = {**fields, "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1))
    with writing(folder):  # its entries (the files' final names) on disk before the folder is renamed into place
        fsync_path(folder)
    return manifest


def verify(folder: Path, required: tuple[str, ...] = ()) -> dict:
    """The folder's manifest, after checking every file it lists (and `required` ones) is there and intact."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IntegrityError(f"{folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{folder}: incomplete (no {MANIFEST}: the write was interrupted)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{folder / MANIFEST}: unreadable ({exc})") from None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        raise IntegrityError(f"{folder / MANIFEST}: not a manifest (no table of files)")
    for name, meta in listed.items():
        f = folder / name
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            raise IntegrityError(f"{folder / MANIFEST}: its entry for {name} is not a size and a checksum")
        if not f.is_file():
            raise IntegrityError(f"{f}: missing")
        if f.stat().st_size != meta["bytes"]:
            raise IntegrityError(f"{f}: {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if sha256_file(f) != meta["sha256"]:
            raise IntegrityError(f"{f}: content does not match its checksum (corrupted)")
    for name in required:
        if name not in listed:
            raise IntegrityError(f"{folder}: the manifest lists no {name}")
    return manifest


def publish(tmp: Path, final: Path) -> None:
    """Move a complete temporary folder into place, replacing any earlier `final` only once the new one is there.

    Between the two renames a crash leaves `final` missing and `.<name>.old` complete; readers that find only
    the latter may use it (`recover`).
    """
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    with writing(final, partial=tmp):
        if final.exists():
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            recover(final)
            raise
        fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """Put back the previous version of a folder if a crash came between publish()'s two renames."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        with writing(final):  # a read-only filesystem: one line naming it
            os.rename(old, final)
