"""Atomic writes and checksummed checkpoints: a crash mid-write never leaves a half-written file,
and a file damaged later (a bad disk, a truncated copy) is detected when it is read."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qkd.distributed import is_main_process
from qkd.errors import QKDError


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: Path, write, before_rename=None) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file renamed over it (readers never see half a
    file), with the mode ``open()`` would give it; ``before_rename()`` runs just before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


CHECKSUM = "checksum"  # the key of a checkpoint's own SHA-256, over everything else it holds


def digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors by dtype, shape and bytes, the rest by ``repr``, dict keys
    sorted, so the same content always gives the same digest, before saving and after loading."""
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, list | tuple):
            h.update(b"[")
            for v in o:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    feed(obj)
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: str | None = None) -> None:
    """``torch.save`` with a checksum to a temporary file, then rename over ``path`` (main process only).

    ``keep_previous``: the name the file being replaced is kept under (``previous.pt``), so that a
    damaged ``path`` still leaves an intact checkpoint one step older."""
    if not is_main_process():
        return
    path = Path(path)
    state = {**state, CHECKSUM: digest(state)}
    previous = path.with_name(keep_previous) if keep_previous else None

    def before_rename() -> None:
        if previous is not None and path.is_file():
            os.replace(path, previous)

    with _reported(path, "the checkpoint before it is intact: free space or fix the folder, then resume"):
        atomic_write(path, lambda f: _torch_save(state, f), before_rename)


class _Sink:
    """The file ``torch.save`` writes to, keeping the ``OSError`` of a failed write: torch's zip writer turns
    it into a ``RuntimeError`` (``unexpected pos 46 vs 0``) that names neither the file nor the cause."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(state: dict[str, Any], f) -> None:
    """``torch.save`` where a failed write (a full disk) is an ``OSError``, as any other file's is."""
    sink = _Sink(f)
    try:
        torch.save(state, sink)
    except RuntimeError as e:
        if sink.error is not None:
            raise sink.error from None
        if not _from_writer(e):
            raise
        raise OSError(_WRITER_PREFIX.sub("", _first_line(e))) from None


#: how torch's zip writer (``inline_container.cc``) begins its errors: ``[enforce fail at inline_container.cc:672] .``
_WRITER_PREFIX = re.compile(r"^\[enforce fail at inline_container\.cc:\d+\]\s*\.?\s*")


def _from_writer(e: RuntimeError) -> bool:
    return "inline_container" in str(e) or "PytorchStreamWriter" in str(e)


@contextmanager
def _reported(path: Path, then: str) -> Iterator[None]:
    """A failed write (no space, no permission) as one line naming the file, the reason and what to do."""
    try:
        yield
    except OSError as e:
        cause = e.strerror or f"{e}{_free_space(path)}"
        raise QKDError(f"cannot write {path}: {cause}; {then}") from None


def _free_space(path: Path) -> str:
    """`` (12 MiB free on its disk)``, for a write that failed without a cause (torch's writer says ``file write
    failed``): a full disk is the usual one, and the user sees at once whether it is."""
    try:
        return f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on its disk)"
    except OSError:
        return ""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint, verified against its checksum (files written before checksums load unverified)."""
    path = Path(path)
    if path.is_dir():
        raise QKDError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise QKDError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise QKDError(f"cannot read checkpoint {path} (damaged or not a checkpoint): {_first_line(e)}") from None
    if isinstance(ckpt, dict) and CHECKSUM in ckpt:
        saved = ckpt.pop(CHECKSUM)
        if digest(ckpt) != saved:
            raise QKDError(f"checkpoint {path} is damaged: its content does not match its checksum")
    return ckpt


def _first_line(e: Exception) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def write_json(obj: Any, path: str | Path) -> None:
    write_text(json.dumps(obj, indent=2) + "\n", path)


def write_text(text: str, path: str | Path) -> None:
    if is_main_process():
        with _reported(Path(path), "free space or fix the folder (a file it replaces is left as it was)"):
            atomic_write(Path(path), lambda f: f.write(text.encode()))
