"""Writing a directory of files so that it is complete or absent: the one atomic writer that checkpoints
(`export.save_pretrained` / `convert_checkpoint`) and LoRA adapters (`train.lora.save_adapter`) go through."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator, Sequence


def _file_mode() -> int:
    """rw for the owner, readable by others as the umask allows (0644 under the usual 022), as `open()` creates
    files: some writers (safetensors' among them) create theirs 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class OutputPathError(OSError):
    """An output directory that cannot be written (under a file, a file itself, no permission); the message
    names the path and the fix."""


def check_writable_dir(path: str, what: str = "output directory") -> None:
    """Fails now, with one line naming the cause, if `path` cannot become a directory we write into: a file is
    in the way (the path itself or one of its parents), or the nearest existing folder refuses a new entry.
    Creates nothing (a probe folder is made and removed)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        existing = path
    else:
        if os.path.lexists(path):
            raise OutputPathError(f"{what} {path!r} is a file; choose a directory path")
        existing = os.path.dirname(path)
        while not os.path.isdir(existing):
            if os.path.lexists(existing):
                raise OutputPathError(f"{what} {path!r} is under the file {existing!r}; choose a directory path")
            existing = os.path.dirname(existing)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".jaxmodels-probe-", dir=existing))
    except OSError as e:
        raise OutputPathError(f"{what} {path!r}: cannot create anything in {existing!r} ({e.strerror}); choose a "
                              "writable location") from None


@contextlib.contextmanager
def atomic_directory(out_dir: str, *, prefix: str = ".jaxmodels-") -> Iterator["Staging"]:
    """Stages files in a temporary folder inside `out_dir` and moves them in only when the block completes.

        with atomic_directory(out) as stage:
            save_file(tensors, stage.path("model.safetensors"))
            ...
            stage.commit(["model.safetensors", "config.json"], stale=lambda name: ...)

    `commit(names, stale)` moves the named files in, in that order (each rename is atomic: put the file that
    marks a complete directory last), gives them the usual file mode, then removes the files of out_dir for
    which `stale(name)` is true (what the previous contents had and the new ones do not overwrite). Until
    commit, out_dir holds what it held before; a failure removes the staging folder, and out_dir too when
    this call created it and it is still empty."""
    out_dir = os.fspath(out_dir)
    check_writable_dir(out_dir)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = Staging(out_dir, tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    try:
        yield staging
        if not staging.committed:
            raise RuntimeError("atomic_directory: the block ended without commit()")
    except BaseException:
        shutil.rmtree(staging.tmp, ignore_errors=True)  # first, so that out_dir can go if it is empty
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    finally:
        shutil.rmtree(staging.tmp, ignore_errors=True)


class Staging:
    """The temporary folder of one `atomic_directory` write."""

    def __init__(self, out_dir: str, tmp: str):
        self.out_dir, self.tmp, self.committed = out_dir, tmp, False

    def path(self, name: str) -> str:
        """Where to write file `name` now."""
        return os.path.join(self.tmp, name)

    def commit(self, names: Sequence[str], stale: Callable[[str], bool] | None = None) -> None:
        mode = _file_mode()
        for name in names:
            os.chmod(self.path(name), mode)
        for name in names:
            os.replace(self.path(name), os.path.join(self.out_dir, name))
        self.committed = True
        if stale is not None:
            for old in os.listdir(self.out_dir):
                if old not in names and stale(old) and os.path.isfile(os.path.join(self.out_dir, old)):
                    os.remove(os.path.join(self.out_dir, old))
