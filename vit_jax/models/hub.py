"""Published ViT checkpoints by name or URL, downloaded once into a cache folder.

`config.init_from` may name a published checkpoint instead of a local path:
  * a name of `CHECKPOINTS`, e.g. "augreg:ViT-B/16" or "vit:ViT-B/16-i21k";
  * a URL: https://... (or http://...).
The table's files live on public Google Cloud Storage (gs://BUCKET/PATH) and are fetched as
https://storage.googleapis.com/BUCKET/PATH (no GCS client or credentials needed); a gs://
URL given in `config.init_from` is a path instead (`vit_jax.paths`), read with the
machine's credentials, so that private buckets and emulators work too.
The file is downloaded once to CACHE/HOST/PATH (CACHE = `config.init_cache_dir`, default
~/.cache/vit_jax/checkpoints; e.g. CACHE/storage.googleapis.com/vit_models/augreg/...npz),
into a temporary file renamed when complete, so an interrupted download leaves nothing
behind. Offline, the error names the URL and the exact path to place the file at by hand.

Checksums: the table holds a sha256 where one is published; none of the vision_transformer
or big_vision files has one, so for them the first download (or the first use of a file
placed by hand) records the file's sha256 and size beside it (PATH.sha256), and every
later use checks the file against that record: a truncated or damaged cache is caught,
a file that was wrong from the start is not.

This is the only module that touches the network; it lives beside `convert` because both
are about the published files, and below `config`, which checks names early.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request

from vit_jax import errors

_GCS = "https://storage.googleapis.com/"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Published:
  """A published checkpoint: where it is and which model reproduces its function."""
  url: str  # gs:// or https://.
  model: str  # The registry name with the file's architecture.
  # VisionTransformer fields the file's function needs beyond the registry entry's.
  fields: dict = dataclasses.field(default_factory=dict)
  sha256: str | None = None  # Published digest, where there is one.


def _augreg(file: str, model: str) -> Published:
  return Published(f"gs://vit_models/augreg/{file}", model)


_BV_S16 = dict(posemb="sincos2d", pool="gap", class_token=False)
_MAP = dict(pool="map", class_token=False)

CHECKPOINTS: dict[str, Published] = {
    # The ViT paper (Dosovitskiy et al. 2021), pre-trained on ImageNet-21k: a zero
    # 21843-class head and a pre_logits layer (dropped by default when fine-tuning).
    **{f"vit:ViT-{m}-i21k": Published(f"gs://vit_models/imagenet21k/ViT-{m.replace('/', '_')}"
                                      ".npz", f"ViT-{m}")
       for m in ("B/16", "B/32", "L/16", "L/32", "H/14")},
    # The same, fine-tuned on ImageNet-1k at 384 px (1000-class head).
    **{f"vit:ViT-{m}-i21k-i1k": Published(
        f"gs://vit_models/imagenet21k+imagenet2012/ViT-{m.replace('/', '_')}.npz", f"ViT-{m}")
       for m in ("B/16", "B/32", "L/16", "L/32")},
    # AugReg (Steiner et al. 2021, "How to train your ViT?"): the recommended ImageNet-21k
    # checkpoints of the vision_transformer README and big_vision's "howto-i21k-*" names.
    "augreg:ViT-Ti/16": _augreg("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
                                "ViT-Ti/16"),
    "augreg:ViT-S/16": _augreg("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
                               "ViT-S/16"),
    "augreg:ViT-S/32": _augreg("S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0.npz",
                               "ViT-S/32"),
    "augreg:ViT-B/16": _augreg("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
                               "ViT-B/16"),
    "augreg:ViT-B/32": _augreg("B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
                               "ViT-B/32"),
    "augreg:ViT-B/8": _augreg("B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
                              "ViT-B/8"),
    "augreg:ViT-L/16": _augreg("L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz",
                               "ViT-L/16"),
    # big_vision's plain ViT-S/16 on ImageNet-1k (Beyer et al. 2022): sincos2d position
    # embedding, global average pooling, no class token, a pre_logits layer.
    **{f"big_vision:ViT-S/16-i1k-{e}ep": Published(f"gs://big_vision/vit_s16_i1k_{e}ep.npz",
                                                   "ViT-S/16", _BV_S16)
       for e in (90, 150, 300)},
    # SigLIP image towers (Zhai et al. 2023): MAP head, no class token; the text tower in
    # the same file is left unused.
    "siglip:ViT-B/16-224": Published("gs://big_vision/siglip/webli_en_b16_224_63724782.npz",
                                     "ViT-B/16", _MAP),
    "siglip:ViT-L/16-256": Published("gs://big_vision/siglip/webli_en_l16_256_60552751.npz",
                                     "ViT-L/16", _MAP),
    "siglip:ViT-So400m/14-224": Published(
        "gs://big_vision/siglip/webli_en_so400m_224_57633886.npz", "ViT-So400m/14"),
    "siglip:ViT-So400m/14-384": Published(
        "gs://big_vision/siglip/webli_en_so400m_384_58765454.npz", "ViT-So400m/14"),
}
FAMILIES = tuple(sorted({name.partition(":")[0] for name in CHECKPOINTS}))


def is_name(spec: str) -> bool:
  """Whether `spec` is meant as a checkpoint name ("family:...", not a URL or a path)."""
  return "://" not in spec and spec.partition(":")[0] in FAMILIES


def is_url(spec: str) -> bool:
  """Whether `spec` is a URL this module downloads (http, https); gs:// are paths."""
  return spec.partition("://")[0] in ("http", "https")


def lookup(name: str) -> Published:
  """The table entry of `name`; MissingCheckpointError listing the names if unknown."""
  if name not in CHECKPOINTS:
    raise errors.MissingCheckpointError(
        f"config.init_from={name!r} is not a known checkpoint name: use one of "
        f"{', '.join(CHECKPOINTS)}, a URL or a path.")
  return CHECKPOINTS[name]


def https_url(url: str) -> str:
  """gs://BUCKET/PATH -> https://storage.googleapis.com/BUCKET/PATH; others unchanged."""
  return _GCS + url[len("gs://"):] if url.startswith("gs://") else url


def cache_path(url: str, cache_dir: str) -> str:
  """Where the file of `url` lies in the cache: CACHE/HOST/PATH."""
  parts = urllib.parse.urlsplit(https_url(url))
  relative = urllib.parse.unquote(parts.path).lstrip("/")
  if not relative or ".." in relative.split("/"):
    raise errors.NotACheckpointError(f"{url} names no file.")
  return os.path.join(os.path.expanduser(cache_dir), parts.netloc, relative)


def resolve(spec: str, cache_dir: str) -> str:
  """A local file for a checkpoint name or URL (downloaded once); other specs unchanged.

  Args:
    spec: `config.init_from`: a name of CHECKPOINTS, an http(s):// URL, or a path.
    cache_dir: the cache folder (`config.init_cache_dir`).

  Returns:
    The path to read: the cached file for a name or URL, else `spec` itself.

  Raises:
    errors.MissingCheckpointError for an unknown name; errors.CheckpointDownloadError when
    the file cannot be downloaded (offline: the message names the path to place it at);
    errors.NotACheckpointError when the file differs from its checksum.
  """
  if is_name(spec):
    entry = lookup(spec)
    url, sha256 = entry.url, entry.sha256
  elif is_url(spec):
    url, sha256 = spec, None
  else:
    return spec
  path = cache_path(url, cache_dir)
  if not os.path.exists(path):
    _download(https_url(url), path)
  _verify(path, sha256)
  return path


def _download(url: str, path: str) -> None:
  """url -> path through a temporary file in the same folder, renamed when complete."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  print(f"Downloading {url} to {path} ...", flush=True)
  try:
    try:
      with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(tmp, "wb") as f:
        expected = response.headers.get("Content-Length")
        size = 0
        for chunk in iter(lambda: response.read(_CHUNK), b""):
          f.write(chunk)
          size += len(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
      raise errors.CheckpointDownloadError(
          f"Cannot download {url} ({type(e).__name__}: {reason}). Without the network, "
          f"download it elsewhere and place it at {path} (config.init_cache_dir holds the "
          "cache).") from e
    if expected is not None and size != int(expected):
      raise errors.CheckpointDownloadError(
          f"The download of {url} stopped after {size} of {expected} bytes: run again, or "
          f"place the file at {path} by hand.")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  print(f"Downloaded {size / 2**20:.1f} MiB.", flush=True)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _verify(path: str, sha256: str | None) -> None:
  """Checks `path` against the published digest, else against the one recorded at its
  first use (recording it then)."""
  record = f"{path}.sha256"
  actual = _sha256(path)
  if sha256 is None and os.path.exists(record):
    with open(record, encoding="utf-8") as f:
      sha256 = f.read().split()[0]
  if sha256 is None:
    tmp = f"{record}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(f"{actual}  {os.path.getsize(path)}\n")
    os.replace(tmp, record)
  elif actual != sha256:
    raise errors.NotACheckpointError(
        f"{path} has sha256 {actual}, not {sha256} (damaged or replaced): delete it (and "
        f"{os.path.basename(record)}) to download it again.")
