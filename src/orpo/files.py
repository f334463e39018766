"""Where orpo writes, and how: its cache folder, and folders and files written as a whole or not at all.

Used by every stage (the tokenized-data cache, the converted builtin model, final/, checkpoints), so it imports
nothing of orpo.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """$ORPO_CACHE, else $XDG_CACHE_HOME/orpo, else ~/.cache/orpo."""
    if os.environ.get("ORPO_CACHE"):
        return Path(os.environ["ORPO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "orpo"


@contextmanager
def atomic_folder(final: Path, main: bool = True, barrier=lambda: None):
    """Write a folder as a whole or not at all: yields a temporary sibling, then adds COMPLETE and renames it to
    `final` (replacing an older one). On any error the temporary folder goes and one clear ValueError is raised
    (a full disk named as such); `final` is never left half-written.

    Several processes may write into it: all enter, the `main` one creates and finishes it, and `barrier` (which
    every process calls) keeps the others from writing before it exists or the main one renaming before they are
    done. A process that fails stops the launch (torchrun ends the others); the debris goes on the next start."""
    tmp = final.parent / f".{final.name}.partial"
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        yield tmp
        barrier()
        if main:
            (tmp / "COMPLETE").write_text("ok\n")
    except Exception as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or "StorageFull" in str(exc)
        reason = "the disk is full" if full else (getattr(exc, "strerror", None) or str(exc).splitlines()[0])
        raise ValueError(f"could not write {final}: {reason} (nothing half-written was left)") from None
    if main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier()


@contextmanager
def atomic_file(final: Path):
    """Write one file as a whole or not at all: yields a temporary sibling path (same folder, same suffix, so
    tools that look at the suffix accept it), renamed to `final` on success and removed on any error, which
    propagates unchanged."""
    tmp = final.with_name(f".{final.stem}.partial{final.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
