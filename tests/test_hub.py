"""Published checkpoints by name and URL: the download cache, checksums, offline errors.

Downloads come from an HTTP server on 127.0.0.1 started here; no test touches the network.
"""
import functools
import http.server
import os
import shutil
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import config as config_lib, errors, models
from vit_jax.models import hub
from vit_jax.train import pretrained

DATA = os.path.join(os.path.dirname(__file__), "data")
FILE = "vit_models/augreg/Tiny.npz"


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves the folder; counts GETs; /short/... promises more bytes than it sends."""
  requests: list = []

  def do_GET(self):  # noqa: N802 (the http.server name)
    type(self).requests.append(self.path)
    if self.path.startswith("/short/"):
      self.send_response(200)
      self.send_header("Content-Length", "1000")
      self.end_headers()
      self.wfile.write(b"x" * 10)
      return
    super().do_GET()

  def log_message(self, *args):
    pass


@pytest.fixture
def server(tmp_path):
  """(base URL, served folder, request log) of a local server holding vit_a.npz at FILE."""
  served = tmp_path / "served"
  os.makedirs(served / os.path.dirname(FILE))
  shutil.copy(os.path.join(DATA, "vit_a.npz"), served / FILE)
  handler = type("Handler", (_Handler,), {"requests": []})
  httpd = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_port}", served, handler.requests
  httpd.shutdown()
  httpd.server_close()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_gs_urls_map_to_the_public_https_endpoint_and_a_cache_path():
  url = "gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
  assert hub.https_url(url) == ("https://storage.googleapis.com/vit_models/augreg/B_16-i21k-"
                                "300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")
  assert hub.cache_path(url, "/c") == ("/c/storage.googleapis.com/vit_models/augreg/B_16-i21k-"
                                       "300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")
  assert hub.lookup("augreg:ViT-B/16").url == url
  assert hub.lookup("vit:ViT-B/16-i21k").url == "gs://vit_models/imagenet21k/ViT-B_16.npz"
  assert hub.is_name("augreg:ViT-B/16") and not hub.is_name("/data/augreg:x.npz")
  assert hub.is_url("https://a/b.npz") and not hub.is_url("/data/b.npz")
  with pytest.raises(errors.NotACheckpointError, match="names no file"):
    hub.cache_path("https://host/../x.npz", "/c")


def test_a_name_downloads_once_into_the_cache_and_loads(server, tmp_path, monkeypatch):
  base, _, requests = server
  monkeypatch.setitem(hub.CHECKPOINTS, "augreg:ViT-B/16",
                      hub.Published(f"{base}/{FILE}", "ViT-B/16"))
  cache = tmp_path / "cache"
  path = hub.resolve("augreg:ViT-B/16", str(cache))
  host = base[len("http://"):]
  assert path == str(cache / host / FILE)
  assert open(path, "rb").read() == open(os.path.join(DATA, "vit_a.npz"), "rb").read()
  record = open(f"{path}.sha256").read().split()
  assert record == [hub._sha256(path), str(os.path.getsize(path))]
  assert sorted(os.listdir(os.path.dirname(path))) == ["Tiny.npz", "Tiny.npz.sha256"]
  assert hub.resolve("augreg:ViT-B/16", str(cache)) == path  # From the cache...
  assert requests == [f"/{FILE}"]  # ... with one download.
  # End to end through config.init_from (validate() would want the ViT-B/16 this name
  # holds; load_params reads whatever the name resolves to: here a tiny ViT).
  config = config_lib.get_base_config()
  config.init_from, config.init_cache_dir = "augreg:ViT-B/16", str(cache)
  model = models.create_model("ViT-Ti/4", num_classes=5, width=16, depth=2, num_heads=2,
                              mlp_dim=32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                             train=False))["params"]
  _, report = pretrained.load_params(config, jax.tree_util.tree_map(jnp.zeros_like, shapes))
  assert report.source.startswith(f"augreg:ViT-B/16 ({path})")
  assert len(report.loaded) == 40 and requests == [f"/{FILE}"]


def test_a_url_downloads_into_the_cache(server, tmp_path):
  base, _, requests = server
  path = hub.resolve(f"{base}/{FILE}", str(tmp_path / "cache"))
  assert path.endswith(FILE) and os.path.exists(f"{path}.sha256")
  assert requests == [f"/{FILE}"]


def test_offline_the_error_names_the_url_and_the_file_to_place(tmp_path, monkeypatch):
  url = f"http://127.0.0.1:{_closed_port()}/{FILE}"
  monkeypatch.setitem(hub.CHECKPOINTS, "augreg:ViT-B/16", hub.Published(url, "ViT-B/16"))
  cache = tmp_path / "cache"
  with pytest.raises(errors.CheckpointDownloadError) as error:
    hub.resolve("augreg:ViT-B/16", str(cache))
  target = cache / url.split("//")[1]
  message = str(error.value)
  assert message.startswith(f"Cannot download {url} (URLError: ")
  assert message.endswith(f"Without the network, download it elsewhere and place it at "
                          f"{target} (config.init_cache_dir holds the cache).")
  assert "\n" not in message  # One line on the command line.
  assert os.listdir(os.path.dirname(target)) == []  # No partial file left.
  # Placed there by hand, it is used without the network, and its checksum recorded.
  shutil.copy(os.path.join(DATA, "vit_a.npz"), target)
  assert hub.resolve("augreg:ViT-B/16", str(cache)) == str(target)
  assert os.path.exists(f"{target}.sha256")


def test_missing_files_and_short_downloads_fail_cleanly(server, tmp_path):
  base, _, _ = server
  cache = tmp_path / "cache"
  with pytest.raises(errors.CheckpointDownloadError,
                     match=r"^Cannot download .*/vit_models/none.npz \(HTTPError: HTTP Error "
                           r"404: File not found\)"):
    hub.resolve(f"{base}/vit_models/none.npz", str(cache))
  with pytest.raises(errors.CheckpointDownloadError,
                     match=r"^The download of .*/short/x.npz stopped after 10 of 1000 bytes: "
                           r"run again, or place the file at .*/short/x.npz by hand.$"):
    hub.resolve(f"{base}/short/x.npz", str(cache))
  leftovers = [f for _, _, files in os.walk(cache) for f in files]
  assert leftovers == []


def test_checksums_published_and_recorded(server, tmp_path, monkeypatch):
  base, _, _ = server
  cache = tmp_path / "cache"
  digest = hub._sha256(os.path.join(DATA, "vit_a.npz"))
  monkeypatch.setitem(hub.CHECKPOINTS, "augreg:ViT-B/16",
                      hub.Published(f"{base}/{FILE}", "ViT-B/16", sha256="0" * 64))
  with pytest.raises(errors.NotACheckpointError, match=rf"has sha256 {digest}, not 0000"):
    hub.resolve("augreg:ViT-B/16", str(cache))
  monkeypatch.setitem(hub.CHECKPOINTS, "augreg:ViT-B/16",
                      hub.Published(f"{base}/{FILE}", "ViT-B/16", sha256=digest))
  path = hub.resolve("augreg:ViT-B/16", str(cache))
  assert not os.path.exists(f"{path}.sha256")  # A published digest needs no record.
  # Without a published digest, the record of the first use catches a damaged cache.
  url = f"{base}/{FILE}"
  path = hub.resolve(url, str(tmp_path / "other"))
  with open(path, "r+b") as f:
    f.seek(100)
    f.write(b"\0" * 8)
  with pytest.raises(errors.NotACheckpointError,
                     match=r"\(damaged or replaced\): delete it \(and Tiny.npz.sha256\) to "
                           r"download it again.$"):
    hub.resolve(url, str(tmp_path / "other"))


def test_every_name_has_a_registered_model_and_a_public_url():
  for name, entry in hub.CHECKPOINTS.items():
    assert entry.model in models.list_models(), name
    assert entry.url.startswith("gs://vit_models/") or entry.url.startswith("gs://big_vision/")
    assert entry.url.endswith(".npz") and hub.is_name(name)
  assert np.unique([e.url for e in hub.CHECKPOINTS.values()]).size == len(hub.CHECKPOINTS)
