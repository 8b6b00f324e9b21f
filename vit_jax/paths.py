"""The one path layer: every file vit_jax reads or writes at a place the user names.

A path is local (`/data/run`, made absolute by the command line) or a URL of a store that
etils.epath reaches through fsspec: `gs://BUCKET/PATH` (gcsfs), and `s3://`, `az://`,
`hf://` where their fsspec package is installed. Orbax checkpoints take the same strings.

What is atomic (a reader sees the old content or the new, never half):
  * local: `write_bytes_atomic`, `write_text_atomic` and `atomic_file` write a temporary
    file beside the target, fsync it and rename it over the target;
  * object stores: each of those is one object upload, which GCS (and S3) make visible
    only when complete (an upload broken off midway leaves the object as it was).
    `append_text` rewrites the whole object (an object cannot be appended to; epath's
    open("a") on gs:// silently overwrites instead), so it is meant for one writer at a
    time, which is how metrics.jsonl is written (process 0).
Object stores have no folders: `makedirs` makes nothing there, a "folder" exists while an
object lies under it, and a rename is a copy and a delete (orbax marks complete checkpoints
with commit_success.txt there instead of renaming).

Local testing against a GCS emulator: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage)
and TENSORSTORE_GCS_HTTP_URL (orbax's array data) name its endpoint; see the README.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

# etils.epath reaches gs:// through tf.io.gfile whenever TensorFlow is installed (it is:
# TFDS needs it), unless EPATH_USE_TF=false. Set before the first gs:// path is used (epath
# caches the choice), so that every client in the process goes through gcsfs and the
# Google Cloud clients: one set of credentials, which orbax (google-cloud-storage for
# deletes, TensorStore for arrays) uses too, and the only way to reach a GCS emulator
# (tf.io.gfile ignores STORAGE_EMULATOR_HOST). A user's own EPATH_USE_TF is kept.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position


def _no_stale_listings() -> None:
  """gcsfs caches folder listings for the life of the process by default, but TensorStore
  (orbax's array writer) and other processes write objects behind its back: a cached
  listing would hide new checkpoints. A user's fsspec configuration is kept."""
  try:
    import fsspec.config  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_no_stale_listings()

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/dir, s3://...) rather than a local path."""
  return bool(_URL.match(os.fspath(path)))


def absolute(path: str) -> str:
  """A local path made absolute (with `~` expanded); a URL as it is."""
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def as_epath(path: str | os.PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


def join(base: str, *parts: str) -> str:
  """`base/part/...`: os.path.join for local paths; "/" for URLs on any platform."""
  if not is_remote(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def basename(path: str) -> str:
  return os.path.basename(os.fspath(path).rstrip("/"))


def dirname(path: str) -> str:
  if not is_remote(path):
    return os.path.dirname(path)
  return path.rstrip("/").rpartition("/")[0]


def exists(path: str) -> bool:
  return os.path.exists(path) if not is_remote(path) else as_epath(path).exists()


def isdir(path: str) -> bool:
  return os.path.isdir(path) if not is_remote(path) else as_epath(path).is_dir()


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  return as_epath(path).is_file()


def listdir(path: str) -> list[str]:
  """The names in folder `path`, sorted; [] when it does not exist."""
  if not isdir(path):
    return []
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in as_epath(path).iterdir())


def makedirs(path: str) -> None:
  """Makes the local folder `path` (and its parents); nothing on an object store."""
  if path and not is_remote(path):
    os.makedirs(path, exist_ok=True)


# pylint: disable-next=redefined-builtin
def open(path: str, mode: str = "r", encoding: str | None = None) -> IO:
  """A file object of `path` for reading (or writing whole objects: mode "w"/"wb")."""
  if "a" in mode and is_remote(path):
    raise ValueError(f"{path}: objects cannot be appended to; use paths.append_text.")
  if not is_remote(path):
    return builtins.open(path, mode, encoding=None if "b" in mode else encoding or "utf-8")
  return as_epath(path).open(mode)


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def _store(path: str):
  """(fsspec filesystem, path within it) of a URL: its uploads commit whole or not at all.

  Not epath's open("wb"): that file object finishes its upload in close(), which runs on
  the way out of an exception too, and an interrupted write would replace the object with
  its first part. put_file and pipe_file commit the object with their last request only.
  """
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.core.url_to_fs(path)


def write_bytes_atomic(path: str, data: bytes) -> None:
  """`data` into `path`, atomically (see the module docstring)."""
  if is_remote(path):
    fs, key = _store(path)
    fs.pipe_file(key, data)
    return
  with atomic_file(path) as tmp:
    with builtins.open(tmp, "wb") as f:
      f.write(data)


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """A local file name to write (for writers that want one: np.savez, savefig), put at
  `path` when the block ends without an error: renamed over it locally, uploaded as one
  object to a store. On an error, `path` is left as it was."""
  if not is_remote(path):
    makedirs(os.path.dirname(path))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
      yield tmp
      with builtins.open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  with tempfile.TemporaryDirectory(prefix="vit_jax-") as folder:
    tmp = os.path.join(folder, basename(path))
    yield tmp
    fs, key = _store(path)
    fs.put_file(tmp, key)


def append_text(path: str, text: str) -> None:
  """Adds `text` at the end of `path` (made if missing). On an object store, the object is
  read and written back whole, as one upload: one writer at a time."""
  if not is_remote(path):
    makedirs(os.path.dirname(path))
    with builtins.open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = read_bytes(path) if exists(path) else b""
  write_bytes_atomic(path, old + text.encode("utf-8"))


def remove(path: str) -> None:
  """Deletes file `path`; a missing one is no error."""
  if not is_remote(path):
    if os.path.lexists(path):
      os.remove(path)
  elif exists(path):
    as_epath(path).unlink()


def rmtree(path: str) -> None:
  """Deletes folder `path` with everything in it; a missing one is no error."""
  if not is_remote(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
  elif isdir(path):
    as_epath(path).rmtree()
