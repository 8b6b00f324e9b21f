"""The path layer: local writes atomic, remote ones single uploads (against the emulator)."""
import os
import uuid

import pytest

from vit_jax import paths


def _crash_while_writing(target: str) -> None:
  """Half a new content written to `target` through atomic_file, then an error."""
  with pytest.raises(RuntimeError):
    with paths.atomic_file(target) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("crash mid-write")


def test_local_writes_are_atomic_and_leave_no_temporaries(tmp_path):
  target = str(tmp_path / "sub" / "run.json")
  paths.write_text_atomic(target, "old")
  _crash_while_writing(target)
  assert paths.read_text(target) == "old"  # The crash left the previous file.
  paths.append_text(target, "+more")
  assert paths.read_text(target) == "old+more"
  assert os.listdir(tmp_path / "sub") == ["run.json"]
  assert paths.join(str(tmp_path), "a", "b") == os.path.join(str(tmp_path), "a", "b")
  assert paths.absolute("rel") == os.path.abspath("rel")
  paths.rmtree(str(tmp_path / "sub"))
  paths.rmtree(str(tmp_path / "sub"))  # Missing: no error.
  assert not paths.exists(str(tmp_path / "sub"))


def test_remote_paths_against_the_emulator(gcs_emulator):
  root = f"gs://bucket/{uuid.uuid4().hex}"
  assert paths.is_remote(root) and paths.absolute(root) == root
  assert paths.join(root + "/", "a", "b.txt") == f"{root}/a/b.txt"
  assert paths.dirname(f"{root}/a/b.txt") == f"{root}/a" and paths.basename(root + "/") != ""
  assert not paths.exists(root) and paths.listdir(root) == []
  paths.makedirs(root)  # Nothing to make on an object store.
  metrics = paths.join(root, "metrics.jsonl")
  paths.append_text(metrics, "1\n")
  paths.append_text(metrics, "2\n")  # Appends, where epath's open("a") would overwrite.
  assert paths.read_text(metrics) == "1\n2\n"
  with pytest.raises(ValueError, match="append_text"):
    paths.open(metrics, "a")
  _crash_while_writing(metrics)
  assert paths.read_text(metrics) == "1\n2\n"  # Nothing was uploaded.
  paths.write_bytes_atomic(paths.join(root, "sub", "x.bin"), b"\0\1")
  assert paths.read_bytes(paths.join(root, "sub", "x.bin")) == b"\0\1"
  assert paths.listdir(root) == ["metrics.jsonl", "sub"]
  assert paths.isdir(paths.join(root, "sub")) and paths.isfile(metrics)
  assert not paths.isdir(metrics) and not paths.isfile(paths.join(root, "sub"))
  paths.remove(metrics)
  paths.remove(metrics)  # Missing: no error.
  paths.rmtree(paths.join(root, "sub"))
  assert not paths.exists(root)


def test_an_upload_broken_off_leaves_the_object_as_it_was(gcs_emulator, monkeypatch):
  """A store's upload commits with its last request: one that fails midway (a dropped
  connection here, after the first 50 MiB chunk) must not replace the object with a part."""
  import gcsfs.core  # pylint: disable=g-import-not-at-top
  target = f"gs://bucket/{uuid.uuid4().hex}/model.npz"
  paths.write_bytes_atomic(target, b"old")
  real_upload_chunk, chunks = gcsfs.core.upload_chunk, []

  async def broken_off(*args, **kwargs):
    chunks.append(1)
    if len(chunks) == 2:
      raise ConnectionResetError("the connection dropped")
    return await real_upload_chunk(*args, **kwargs)

  monkeypatch.setattr(gcsfs.core, "upload_chunk", broken_off)
  new = b"n" * (51 << 20)
  with pytest.raises(ConnectionResetError):
    with paths.atomic_file(target) as tmp:
      with open(tmp, "wb") as f:
        f.write(new)
  assert paths.read_bytes(target) == b"old" and len(chunks) == 2
  chunks.clear()
  with pytest.raises(ConnectionResetError):
    paths.write_bytes_atomic(target, new)
  assert paths.read_bytes(target) == b"old" and len(chunks) == 2
  monkeypatch.undo()
  paths.write_bytes_atomic(target, new)  # The same upload, unbroken, commits.
  assert paths.read_bytes(target) == new
