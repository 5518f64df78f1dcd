"""The one path layer for everything a run reads and writes (workdir, checkpoints, exports): `etils.epath`, so a
local folder and `gs://bucket/dir` behave alike. Cloud storage is not a disk (appends overwrite, a write shows
only on close, listings are cached); the helpers here are written for both."""

from __future__ import annotations

import contextlib
import io
import os
from typing import IO, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(p: PathLike) -> bool:
  """Whether `p` is a URI (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """An `epath.Path`: URIs as given, local paths made absolute (Orbax wants absolute local paths)."""
  return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def join(base: PathLike, *parts: str) -> str:
  """`base/part/...` as a string (for config fields); a relative local `base` stays relative."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def makedirs(p: PathLike) -> None:
  """Creates a local folder; nothing on object stores, where folders exist only as prefixes of objects."""
  if not is_remote(p):
    os.makedirs(path(p), exist_ok=True)


def refresh(p: PathLike | None = None) -> None:
  """Drops cached listings (gcsfs caches them per process) so files written by another process, or by
  tensorstore in this one, are seen with their current size. Cheap; call it before reading what others wrote."""
  if p is not None and not is_remote(p):
    return
  fs = epath.backend.fsspec_backend.fs(os.fspath(p) if p is not None else "gs://")
  fs.invalidate_cache()


def listdir(p: PathLike) -> list[str]:
  """Names in folder `p` ([] when it does not exist: an object-store folder without objects does not)."""
  d = path(p)
  return sorted(c.name for c in d.iterdir()) if d.exists() else []


def read_text(p: PathLike) -> str | None:
  """The text of file `p`, or None when there is none."""
  f = path(p)
  try:
    return f.read_text()
  except FileNotFoundError:
    return None


@contextlib.contextmanager
def open_write(p: PathLike, mode: str = "wb") -> Iterator[IO]:
  """Writes file `p` whole or not at all: the file appears only if the block finishes.

  Local: into `p.partial`, renamed over `p` at the end. Object stores: streamed through epath's file object
  (constant memory, no local copy), which creates the object only on close; on an error the upload is
  cancelled instead of closed, so no truncated object replaces an older good one.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"open_write mode must be 'w' or 'wb', got {mode!r}")
  dest = path(p)
  if not is_remote(p):
    tmp = dest.with_name(dest.name + ".partial")
    try:
      with tmp.open(mode) as f:
        yield f
      os.replace(tmp, dest)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
    return
  f = dest.open(mode)
  try:
    yield f
  except BaseException:
    raw = f.buffer if isinstance(f, io.TextIOWrapper) else f  # text mode wraps the gcsfs file
    if hasattr(raw, "discard"):
      raw.discard()
      raw.closed = True  # else its finalizer would close, i.e. commit, the partial object
    raise
  f.close()


def write_bytes(p: PathLike, data: bytes) -> None:
  """Replaces file `p` with `data` in one piece (never a half-written file, on a disk or a bucket)."""
  with open_write(p, "wb") as f:
    f.write(data)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def upload(local_file: PathLike, dest: PathLike) -> None:
  """Copies local file `local_file` to `dest` (a local path or a URI) whole."""
  if is_remote(dest):
    fs = epath.backend.fsspec_backend.fs(os.fspath(dest))
    fs.put_file(os.fspath(local_file), os.fspath(dest))
  else:
    with open(local_file, "rb") as src, open_write(dest, "wb") as f:
      while chunk := src.read(64 << 20):
        f.write(chunk)


def remove(p: PathLike) -> None:
  path(p).unlink()


def rmtree(p: PathLike) -> None:
  path(p).rmtree()
