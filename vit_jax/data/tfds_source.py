"""TFDS datasets as sources: found by name, prepared on first use, read into memory or on
demand.

Fixed-shape datasets (CIFAR, the MNIST family) are held in memory as stored
(`ArraySource`), or read record by record when big (> MAX_IN_MEMORY_EXAMPLES) and TFDS
has array_record files (`StreamingSource`); the device augments them. Datasets of photos
of varying size (ImageNet, pets, ...) are kept encoded, read on demand from array_record
files (else held encoded in memory), and decoded and cropped at full resolution on the
host, in the input pipeline's workers (`PhotoSource`).

Preparation: from `config.manual_dir` when set (the files are checked first: TFDS would
quietly download what is missing), else by download; without network the download stops
at once, naming the hosts that do not resolve and the files for config.manual_dir. A
failed build leaves nothing behind in `config.data_dir`. Processes of one machine that
start at once prepare a dataset once: the first builds, the others wait for it.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import importlib.util
import io
import functools
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vit_jax import errors, parallel, paths
from vit_jax.data.sources import ArraySource, PhotoSource, Source, StreamingSource

# Beyond this many examples a split is read on demand instead of held in memory.
MAX_IN_MEMORY_EXAMPLES = 200_000
_READ_CHUNK = 4096  # Examples per tf.data batch when reading a split into memory.


def load(config: ml_collections.ConfigDict, split: str) -> Source:
  builder = _prepared_once(config)
  info = builder.info
  num_examples = _split_size(builder, split)
  image_key, label_key = _supervised_keys(info)
  shape = tuple(info.features[image_key].shape)
  common = dict(class_names=info.features[label_key].names, name=builder.name, split=split)
  if None in shape:
    return _photos(config, builder, split, image_key, label_key, shape[-1], common)
  if (num_examples or 0) > MAX_IN_MEMORY_EXAMPLES and _has_array_record(info):
    return StreamingSource(builder.as_data_source(split=split), image_key=image_key,
                           label_key=label_key, image_shape=shape, **common)
  _check_fits_in_memory(builder, split, num_examples, (num_examples or 0) * int(np.prod(shape)))
  images, labels = _read_split(builder, split, image_key, label_key)
  return ArraySource(images, labels, **common)


def _supervised_keys(info: tfds.core.DatasetInfo) -> tuple[str, str]:
  keys = info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return "image", "label"


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.DatasetNotFoundError:
    pass
  name = config.dataset.split(":")[0].split("/")[0]
  close = difflib.get_close_matches(
      name, tfds.list_builders(with_community_datasets=False) + ["folder"], n=3)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  raise errors.DataError(f"Unknown dataset {config.dataset!r}.{hint} Set config.dataset to a "
                   "TFDS name (tfds.list_builders()) or to 'folder' for an image folder "
                   "in config.data_dir.")


def _prepared_once(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """`_prepared_builder` in a multi-process run: process 0 prepares the dataset while the
  others wait, then all read it (in a shared data_dir, at once: no two processes write
  the same files; in a local one, each host's own copy is then made by its process).
  Where process 0 fails, every process stops."""
  if jax.process_count() > 1:
    error = None
    if jax.process_index() == 0:
      try:
        _prepared_builder(config)
      except Exception as e:  # pylint: disable=broad-except  # Raised below, after all know.
        error = e
    if parallel.processes_where_not(error is None):  # The others would wait for good.
      if error is not None:
        raise error
      raise errors.DataError(f"Process 0 could not prepare {config.dataset}: its error is "
                             "in its output.")
  return _prepared_builder(config)


def _prepared_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of `config.dataset`, prepared in `config.data_dir` if it was not."""
  builder = _builder(config)
  if builder.is_prepared():
    return builder
  # Runs started together on one machine (seeds, a sweep) share the data_dir: one builds,
  # the others wait and read its copy. Unserialised, TFDS's rename of the second build
  # fails, and that failure's clean-up would delete the first build under its run.
  with _preparation_lock(builder):
    builder = _builder(config)  # Read afresh: what another process prepared meanwhile.
    if not builder.is_prepared():
      _prepare(builder, config)
  return builder


@contextlib.contextmanager
def _preparation_lock(builder: tfds.core.DatasetBuilder):
  """Holds an exclusive lock on `builder`'s dataset among the processes of this machine.

  The lock file lives in the temp folder (keyed by the dataset's path), not in data_dir:
  a failed build leaves nothing behind there, and gs:// has no locks. Processes of a
  multi-host run do not need it: process 0 prepares while the others wait (_prepared_once).
  """
  key = hashlib.sha256(os.fspath(builder.data_path).encode()).hexdigest()[:16]
  lock_dir = Path(tempfile.gettempdir()) / "vit_jax_locks"
  lock_dir.mkdir(exist_ok=True)
  fd = os.open(lock_dir / f"{builder.name}-{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"Waiting for another process that is preparing {builder.name} in "
            f"{builder.data_path} ...", flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _prepare(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> None:
  """Downloads (or reads from config.manual_dir) and prepares `builder`'s dataset."""
  _hide_accelerators_from_tensorflow()
  if not sys.stderr.isatty():  # tqdm's bars: in a log file, lines of escape codes.
    tfds.disable_progress_bar()
  # TFDS announces a build from files with "Unknown size" everywhere: ours instead.
  tfds_says = contextlib.nullcontext()
  if config.manual_dir:
    _check_manual_dir(builder, paths.as_epath(config.manual_dir))  # Local or gs://.
    print(f"Preparing {builder.name} in {builder.data_path} from manual_dir "
          f"{config.manual_dir} ...", flush=True)
    download_config = tfds.download.DownloadConfig(manual_dir=config.manual_dir,
                                                   try_download_gcs=False)
    tfds_says = contextlib.redirect_stdout(io.StringIO())
  else:
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      raise errors.MissingDataError(
          f"{builder.name} cannot be downloaded: put its files in a folder and set "
          f"config.manual_dir to it.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    _check_download_hosts(builder)
    print(f"Downloading and preparing {builder.name} in {builder.data_path} ...",
          flush=True)
    download_config = tfds.download.DownloadConfig()
  # TFDS writes into an "incomplete" folder and renames it when done; what it made
  # around that (the dataset's parent folders) goes too, so no trace of a failed
  # build is left for a later run to trip over.
  new_dir = _first_missing_dir(builder)
  start = time.time()
  try:
    with tfds_says:
      builder.download_and_prepare(
          download_config=download_config,
          file_format="array_record" if _streams(builder) and _array_record_installed()
          else None)
  except BaseException as e:
    if new_dir is not None:
      shutil.rmtree(new_dir, ignore_errors=True)
    if config.manual_dir or not isinstance(e, Exception):
      raise
    raise errors.MissingDataError(
        f"Could not download {builder.name} ({type(e).__name__}: {e}). Without network, "
        f"put {_manual_files_hint(builder)} in a folder and set config.manual_dir to "
        "it.") from e
  examples = sum(split.num_examples for split in builder.info.splits.values())
  print(f"Prepared {builder.name}: {examples:,} examples in {time.time() - start:.0f} s.",
        flush=True)


def _resolve_host(host: str) -> None:
  """Raises OSError (socket.gaierror) when `host` has no address. Tests replace it: none
  of them may touch the network."""
  socket.getaddrinfo(host, 443)


# TFDS first looks for a prepared copy of the dataset on Google Cloud Storage.
_TFDS_GCS_HOST = "storage.googleapis.com"


def _check_download_hosts(builder: tfds.core.DatasetBuilder) -> None:
  """Stops at once when neither the dataset's download hosts nor TFDS's Cloud Storage
  resolve (no network): TFDS would retry each download with growing pauses for minutes
  before failing."""
  if urllib.request.getproxies():  # A proxy resolves the names itself.
    return
  urls = builder.url_infos or {}
  hosts = sorted({urllib.parse.urlparse(url).hostname for url in urls} - {None})
  failures = []
  for host in [*hosts, _TFDS_GCS_HOST] if hosts else []:
    try:
      _resolve_host(host)
      return  # Something answers: TFDS may get the data from there.
    except OSError as e:
      failures.append(f"{host} ({e})")
  if failures:
    raise errors.MissingDataError(
        f"Cannot download {builder.name}: no host it downloads from resolves "
        f"({'; '.join(failures)}); no network? Without network, put "
        f"{_manual_files_hint(builder)} in a folder and set config.manual_dir to it.")


def _hide_accelerators_from_tensorflow() -> None:
  """TFDS runs TensorFlow on the host; on a GPU it would reserve memory JAX needs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Only to prepare/read.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow had already set up its devices.
    pass


def _streams(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the dataset is known before preparing to be read on demand."""
  image_key, _ = _supervised_keys(builder.info)
  splits = builder.info.splits
  return (None in builder.info.features[image_key].shape or
          any(s.num_examples > MAX_IN_MEMORY_EXAMPLES for s in splits.values()))


def _array_record_installed() -> bool:
  return importlib.util.find_spec("array_record") is not None


def _has_array_record(info: tfds.core.DatasetInfo) -> bool:
  return tfds.core.FileFormat.ARRAY_RECORD in info.available_file_formats()


def _expected_files(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The file names TFDS looks for in a manual_dir (from its checksum list)."""
  return sorted(info.filename or Path(urllib.parse.urlparse(url).path).name
                for url, info in (builder.url_infos or {}).items())


def _manual_files_hint(builder: tfds.core.DatasetBuilder) -> str:
  files = _expected_files(builder)
  return ", ".join(files) if files else "the files from the dataset's homepage"


def _check_manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: Path) -> None:
  # TFDS quietly downloads whatever it cannot find in the manual_dir: stop first.
  missing = [f for f in _expected_files(builder) if not (manual_dir / f).exists()]
  if missing:
    raise errors.MissingDataError(
        f"{builder.name}: config.manual_dir={manual_dir} lacks {', '.join(missing)}. "
        f"Put {_manual_files_hint(builder)} there (or unset config.manual_dir to "
        "download).")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (
      manual_dir.is_dir() and any(manual_dir.iterdir())):
    raise errors.MissingDataError(f"{builder.name}: config.manual_dir={manual_dir} is empty or "
                            f"missing.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def _first_missing_dir(builder: tfds.core.DatasetBuilder) -> Path | None:
  """The outermost folder of the dataset's data path that does not exist yet."""
  root, data_path = Path(builder.data_dir_root), Path(builder.data_path)
  for depth in range(1, len(data_path.relative_to(root).parts) + 1):
    path = root.joinpath(*data_path.relative_to(root).parts[:depth])
    if not path.exists():
      return path
  return None


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int | None:
  """Examples in `split`; None where TFDS does not know (e.g. under tfds mocks)."""
  splits = builder.info.splits
  if not splits:
    return None
  try:
    return splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise errors.DataError(
        f"Cannot read split {split!r} of {builder.name} ({e}). Available splits: "
        f"{', '.join(splits)}; slices like 'train[:90%]' or 'train[90%:]' work too. "
        "Set config.train_split / eval_split / val_split accordingly.") from None


def _read_split(builder: tfds.core.DatasetBuilder, split: str, image_key: str,
                label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole split as arrays, in the split's stored order."""
  if tfds.core.FileFormat.TFRECORD not in builder.info.available_file_formats():
    # Built in another format (array_record) that tf.data cannot read: go record by record.
    records = builder.as_data_source(split=split)
    examples = [records[i] for i in range(len(records))]
    return (np.stack([ex[image_key] for ex in examples]),
            np.asarray([ex[label_key] for ex in examples]))
  _hide_accelerators_from_tensorflow()
  # Keyword arguments only: tfds.testing.mock_data's stand-in accepts no others.
  dataset = builder.as_dataset(split=split, shuffle_files=False).batch(_READ_CHUNK)
  chunks = list(tfds.as_numpy(dataset))
  return (np.concatenate([c[image_key] for c in chunks]),
          np.concatenate([c[label_key] for c in chunks]))


def _photos(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, split: str,
            image_key: str, label_key: str, channels: int, common: dict[str, Any]) -> Source:
  """The split's images kept encoded: from array_record files on demand, else in memory."""
  keep_encoded = {image_key: tfds.decode.SkipDecoding()}
  if _has_array_record(builder.info):
    records = builder.as_data_source(split=split, decoders=keep_encoded)
  else:
    _check_fits_in_memory(builder, split, _split_size(builder, split), _split_bytes(builder, split))
    _hide_accelerators_from_tensorflow()
    dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=keep_encoded)
    records = [{image_key: bytes(ex[image_key]), label_key: int(ex[label_key])}
               for ex in tfds.as_numpy(dataset)]
  read = functools.partial(_read_record, records, image_key, label_key,
                           f"{builder.name}:{split}")
  return PhotoSource.from_config(read, len(records), config, channels=channels, **common)


def _read_record(records: Any, image_key: str, label_key: str, what: str,
                 index: int) -> tuple[bytes, int, str]:
  record = records[index]
  return bytes(record[image_key]), int(record[label_key]), f"{what}[{index}]"


def _split_bytes(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """At most the stored size of `split` (encoded images): that of the whole splits it
  slices (e.g. all of "train" for "train[:99%]"); 0 where TFDS does not know it."""
  try:
    return sum(int(builder.info.splits[part.split("[")[0].strip()].num_bytes or 0)
               for part in split.split("+"))
  except (KeyError, ValueError, AttributeError):
    return 0


def _check_fits_in_memory(builder: tfds.core.DatasetBuilder, split: str,
                          num_examples: int | None, needed: int) -> None:
  available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if needed > available // 2:
    raise errors.DataError(
        f"{builder.name}:{split}: {f'{num_examples} images' if num_examples else 'its images'}"
        f" need {needed / 2**30:.1f} GiB, more "
        "than half of this machine's memory. Add array_record files for random access: "
        f"tfds convert_format --dataset_version_dir={builder.data_path} "
        "--out_file_format=array_record")
