"""Tests of the input pipeline: sources, deterministic resumable batches, eval, errors."""
import io
import json
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import config as config_lib, data, errors, parallel
from vit_jax.data import catalog, folders, pipeline, tfds_source

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def make_config(**overrides):
  config = config_lib.get_base_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to reach the network fails the test loudly."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"The test tried to use the network: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


def indexed_source(num_examples: int) -> data.ArraySource:
  """Example i has label i and every pixel equal to i % 256, so batches show indices."""
  pixels = (np.arange(num_examples) % 256).astype(np.uint8)
  images = np.broadcast_to(pixels[:, None, None, None], (num_examples, 4, 4, 3)).copy()
  return data.ArraySource(images, np.arange(num_examples),
                          class_names=[str(i) for i in range(num_examples)])


def labels_of(batches) -> np.ndarray:
  return np.concatenate([np.asarray(b["label"]) for b in batches])


def take(iterator, n: int) -> list:
  return [next(iterator) for _ in range(n)]


# --- Fashion-MNIST, built offline from the official files ---------------------------------


@pytest.fixture(scope="module")
def fashion_config(fashion_mnist_dirs):
  """Fashion-MNIST built once per session from the official files (see conftest.py)."""
  manual_dir, data_dir = fashion_mnist_dirs
  return make_config(dataset="fashion_mnist", manual_dir=manual_dir, data_dir=data_dir)


@pytest.fixture(scope="module")
def fashion_train(fashion_config):
  return data.load_source(fashion_config, "train")


def test_fashion_mnist_from_manual_dir(fashion_config, fashion_train):
  train = fashion_train
  test = data.load_source(fashion_config, "test")
  assert (len(train), len(test)) == (60000, 10000)
  assert train.class_names == FASHION_CLASSES and train.num_classes == 10
  assert train.image_shape == test.image_shape == (28, 28, 1)
  batch = train.get(np.arange(5))
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  mean, std = train.channel_mean_std()
  assert mean.shape == std.shape == (1,) and mean.dtype == np.float32
  # The well-known Fashion-MNIST statistics, 0.2860 and 0.3530 in 0..1 units.
  np.testing.assert_allclose(mean, [0.2860 * 255], atol=0.05)
  np.testing.assert_allclose(std, [0.3530 * 255], atol=0.05)


def test_fashion_mnist_slices_partition_the_split(fashion_config, fashion_train):
  head = data.load_source(fashion_config, "train[:90%]")
  tail = data.load_source(fashion_config, "train[90%:]")
  full = fashion_train
  assert (len(head), len(tail)) == (54000, 6000)
  np.testing.assert_array_equal(np.concatenate([head.labels, tail.labels]), full.labels)
  np.testing.assert_array_equal(tail.images[:3], full.images[54000:54003])
  assert len(data.load_source(fashion_config, "test[:512]")) == 512


def test_split_that_does_not_exist(fashion_config):
  with pytest.raises(ValueError, match=r"Cannot read split 'validation' of fashion_mnist"
                     r".*Available splits: train, test"):
    data.load_source(fashion_config, "validation")


def test_fashion_mnist_throughput(fashion_config, fashion_train, mesh):
  rate = data.measure_input_throughput(fashion_train, fashion_config, mesh, num_batches=20)
  assert rate > 2000  # The CPU model step takes ~40 images/s.


# --- Missing data, failed builds, unknown names --------------------------------------------


def test_missing_manual_files_fail_clearly_offline(tmp_path, no_network):
  manual_dir, data_dir = tmp_path / "manual", tmp_path / "tfds"
  manual_dir.mkdir()
  config = make_config(dataset="fashion_mnist", manual_dir=str(manual_dir),
                       data_dir=str(data_dir))
  with pytest.raises(FileNotFoundError) as error:
    data.load_source(config, "train")
  message = str(error.value)
  assert f"config.manual_dir={manual_dir}" in message
  for name in FASHION_FILES:
    assert name in message
  assert not data_dir.exists() or not any(data_dir.iterdir())


def test_failed_build_leaves_no_dataset_dir(tmp_path, no_network):
  manual_dir, data_dir = tmp_path / "manual", tmp_path / "tfds"
  manual_dir.mkdir()
  for name in FASHION_FILES:  # Right names, wrong contents: TFDS rejects the checksums.
    (manual_dir / name).write_bytes(b"not the real file")
  config = make_config(dataset="fashion_mnist", manual_dir=str(manual_dir),
                       data_dir=str(data_dir))
  with pytest.raises(Exception, match="(?i)checksum"):
    data.load_source(config, "train")
  assert not (data_dir / "fashion_mnist").exists()


def test_unknown_dataset_suggests_close_names():
  with pytest.raises(ValueError, match=r"Unknown dataset 'cifar1000'\. Did you mean: "
                     r"cifar100, cifar10"):
    data.load_source(make_config(dataset="cifar1000"), "train")


# --- TFDS with mocked data -----------------------------------------------------------------


def test_cifar100_with_mock_data(tmp_path):
  config = make_config(dataset="cifar100", data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=48):
    source = data.load_source(config, "train")
  assert isinstance(source, data.ArraySource)
  assert len(source) == 48 and source.image_shape == (32, 32, 3)
  assert source.num_classes == 100 and len(source.class_names) == 100
  assert 0 <= source.labels.min() and source.labels.max() < 100
  assert len(np.unique(source.labels)) > 10  # Random labels, not one constant.


def test_offline_download_fails_at_once_naming_the_host(tmp_path, monkeypatch):
  def no_address(host):
    raise socket.gaierror(-2, "Name or service not known")

  monkeypatch.setattr(tfds_source, "_resolve_host", no_address)
  for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
    monkeypatch.delenv(proxy, raising=False)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("TFDS was asked to download"))
  config = make_config(dataset="cifar100", data_dir=str(tmp_path))
  with pytest.raises(errors.MissingDataError) as error:
    data.load_source(config, "train")
  assert str(error.value) == (
      "Cannot download cifar100: no host it downloads from resolves (www.cs.toronto.edu "
      "([Errno -2] Name or service not known); storage.googleapis.com ([Errno -2] Name or "
      "service not known)); no network? Without network, put cifar-100-binary.tar.gz in a "
      "folder and set config.manual_dir to it.")
  assert not any(tmp_path.iterdir())  # Nothing half-made in the data dir.
  # Where TFDS's Cloud Storage resolves, TFDS is left to try it.
  monkeypatch.setattr(tfds_source, "_resolve_host",
                      lambda host: no_address(host) if host != "storage.googleapis.com" else None)
  with pytest.raises(pytest.fail.Exception, match="TFDS was asked to download"):
    data.load_source(config, "train")


def test_tfds_photos_are_kept_encoded_and_cropped_on_the_host(tmp_path):
  config = make_config(dataset="tf_flowers", data_dir=str(tmp_path), image_size=24)
  with tfds.testing.mock_data(num_examples=20):
    source = data.load_source(config, "train")
  assert isinstance(source, data.PhotoSource) and source.host_crops
  assert len(source) == 20 and source.image_shape == (24, 24, 3)
  assert source.class_names == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
  batch = source.get(np.arange(20))
  assert batch["image"].shape == (20, 24, 24, 3) and batch["image"].dtype == np.uint8


def test_photos_too_big_for_memory_ask_for_array_record(tmp_path, monkeypatch):
  config = make_config(dataset="tf_flowers", data_dir=str(tmp_path), image_size=24)
  monkeypatch.setattr(tfds_source, "_split_bytes", lambda builder, split: 2**50)
  with tfds.testing.mock_data(num_examples=20):
    with pytest.raises(errors.DataError, match=r"tf_flowers:train: its images need "
                       r"1048576.0 GiB, more than half of this machine's memory. Add "
                       r"array_record files for random access: tfds convert_format"):
      data.load_source(config, "train")


def test_tfds_random_access_source(tmp_path, monkeypatch, mesh):
  config = make_config(dataset="tf_flowers", data_dir=str(tmp_path), image_size=16)
  # The mocks store no files; pretend the build has array_record ones to read on demand.
  monkeypatch.setattr(tfds_source, "_has_array_record", lambda info: True)
  with tfds.testing.mock_data(num_examples=20):
    source = data.load_source(config, "train")
    assert isinstance(source, data.PhotoSource)
    assert len(source) == 20 and source.image_shape == (16, 16, 3)
    batch = source.get(np.array([3, 0, 3]))
    assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][0], batch["image"][2])
    assert set(batch["label"]) <= set(range(5))
    mean, std = source.channel_mean_std()
    assert mean.shape == (3,) and np.all(std > 0)
    with data.train_iterator(source, batch_size=8, seed=0, mesh=mesh) as batches:
      assert next(batches)["image"].shape == (8, 16, 16, 3)


class TinyGreys(tfds.core.GeneratorBasedBuilder):
  """12 greyscale 4x4 images: image i has every pixel 20 * i and label i % 3."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 1)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"])}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      yield i, {"image": np.full((4, 4, 1), 20 * i, np.uint8), "label": i % 3}


def test_runs_started_together_prepare_the_dataset_once(tmp_path, no_network, monkeypatch,
                                                        capsys):
  real_build = TinyGreys.download_and_prepare

  def slow_build(self, **kwargs):
    time.sleep(1.0)  # Both runs ask for the dataset before either has built it.
    real_build(self, **kwargs)

  monkeypatch.setattr(TinyGreys, "download_and_prepare", slow_build)
  config = make_config(dataset="tiny_greys", data_dir=str(tmp_path))
  outcomes = [None, None]

  def run(i):
    try:
      outcomes[i] = sorted(data.load_source(config, "train").images[:, 0, 0, 0].tolist())
    except Exception as e:  # pylint: disable=broad-except
      outcomes[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=120)
  assert outcomes == [[20 * i for i in range(12)]] * 2
  printed = capsys.readouterr().out
  assert printed.count("Prepared tiny_greys") == 1, printed
  assert printed.count("Waiting for another process that is preparing tiny_greys") == 1


# What a machine without TensorFlow runs (e.g. a GPU image with only jax): every import of
# tensorflow fails, and the builder class is not defined, so TFDS must read it from files.
_READ_WITHOUT_TENSORFLOW = """
import importlib.abc, json, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      raise ImportError("no TensorFlow on this machine")
sys.meta_path.insert(0, NoTensorFlow())
from vit_jax import config as config_lib, data
config = config_lib.get_base_config()
config.dataset, config.data_dir = "tiny_greys", sys.argv[1]
source = data.load_source(config, "train")
print(json.dumps(dict(pixels=source.images[:, 0, 0, 0].tolist(), labels=source.labels.tolist(),
                      classes=source.class_names, shape=source.image_shape,
                      tensorflow="tensorflow" in sys.modules)))
"""


def test_array_record_dataset_is_read_without_tensorflow(tmp_path, no_network):
  TinyGreys(data_dir=str(tmp_path)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      file_format="array_record")
  result = subprocess.run([sys.executable, "-c", _READ_WITHOUT_TENSORFLOW, str(tmp_path)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  read = json.loads(result.stdout.strip().splitlines()[-1])
  # TFDS stores the examples in an order of its own (hashes of their keys).
  examples = sorted(zip(read.pop("pixels"), read.pop("labels")))
  assert examples == [(20 * i, i % 3) for i in range(12)]
  assert read == dict(classes=["a", "b", "c"], shape=[4, 4, 1], tensorflow=False)


def test_catalog_agrees_with_tfds(no_network):
  """Bench mode compiles the step for the catalog's layout: it must be TFDS's own."""
  for name in [*catalog.KNOWN_DATASETS, *catalog.KNOWN_VARIABLE_SIZE]:
    info = tfds.builder(name).info  # The features are in the code: nothing is read.
    image_key, label_key = tfds_source._supervised_keys(info)  # pylint: disable=protected-access
    shape, classes = info.features[image_key].shape, info.features[label_key].num_classes
    if name in catalog.KNOWN_DATASETS:
      assert catalog.KNOWN_DATASETS[name] == (shape, classes), name
    else:
      assert None in shape and catalog.KNOWN_VARIABLE_SIZE[name] == classes, (name, shape)


# --- Image folders ---------------------------------------------------------------------------

COLORS = {"bird": (0, 0, 255), "cat": (255, 0, 0), "dog": (0, 255, 0)}


def write_image(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, color).save(path)


@pytest.fixture
def image_folder(tmp_path):
  """RGB PNGs and JPEGs of varying size plus one grayscale PNG; a colour per class."""
  sizes = [(40, 30), (17, 50), (64, 64), (33, 21)]
  for cls, color in COLORS.items():
    for i, size in enumerate(sizes):
      write_image(tmp_path / "train" / cls / f"{i}.{'png' if i % 2 else 'jpg'}", size, color)
    write_image(tmp_path / "test" / cls / "0.png", (25, 25), color)
  gray = (tmp_path / "train" / "cat" / "gray.png")
  write_image(gray, (20, 20), 128, mode="L")
  (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
  return tmp_path


def folder_config(root: Path, **overrides):
  return make_config(dataset="folder", data_dir=str(root), image_size=16, **overrides)


def everything(source: data.Source) -> dict[str, np.ndarray]:
  """Every example of `source` (its evaluation view)."""
  return source.get(np.arange(len(source)))


def test_folder_source(image_folder):
  train = data.load_source(folder_config(image_folder), "train")
  test = data.load_source(folder_config(image_folder), "test")
  assert train.class_names == test.class_names == ["bird", "cat", "dog"]
  assert (len(train), len(test)) == (13, 3)
  assert train.image_shape == test.image_shape == (16, 16, 3)  # image_size, RGB.
  train, test = everything(train), everything(test)
  np.testing.assert_array_equal(np.bincount(train["label"]), [4, 5, 4])
  for images, labels in ((train["image"], train["label"]), (test["image"], test["label"])):
    for image, label in zip(images, labels):
      name = ["bird", "cat", "dog"][label]
      mean = image.reshape(-1, 3).mean(0)
      expected = (128, 128, 128) if np.ptp(mean) < 5 else COLORS[name]
      np.testing.assert_allclose(mean, expected, atol=6)
  # The grayscale image sits among the cats, with equal channels.
  gray = [i for i, im in enumerate(train["image"]) if np.ptp(im.reshape(-1, 3).mean(0)) < 5]
  assert len(gray) == 1 and train["label"][gray[0]] == 1  # A cat.


def test_folder_slices_partition_and_mix_classes(image_folder):
  config = folder_config(image_folder)
  head = data.load_source(config, "train[:50%]")
  tail = data.load_source(config, "train[50%:]")
  full = data.load_source(config, "train")
  assert len(head) + len(tail) == len(full)
  labels = [everything(s)["label"] for s in (head, tail, full)]
  np.testing.assert_array_equal(np.concatenate(labels[:2]), labels[2])
  assert len(set(labels[0])) > 1  # A fixed shuffled order, not one class after another.


def test_splits_take_the_training_splits_channels(tmp_path):
  # A greyscale dataset with one colour file among its test images: the test split is
  # decoded to one channel too (as PIL's "L"), or the model built for the training
  # images could not evaluate it.
  for cls in ("a", "b"):
    write_image(tmp_path / "train" / cls / "x.png", (9, 12), 200, mode="L")
    write_image(tmp_path / "test" / cls / "y.png", (9, 12), 90, mode="L")
  write_image(tmp_path / "test" / "a" / "colour.png", (9, 12), (255, 0, 0))
  config = folder_config(tmp_path)
  test = data.load_source(config, "test")
  assert test.image_shape == data.load_source(config, "train").image_shape == (16, 16, 1)
  assert sorted(np.unique(everything(test)["image"]).tolist()) == [76, 90]  # Red's luma: 76.
  # One colour file among the training images: every split is RGB.
  write_image(tmp_path / "train" / "b" / "colour.png", (9, 12), (0, 0, 255))
  folders._training_channels.cache_clear()  # pylint: disable=protected-access
  test = data.load_source(config, "test")
  assert test.image_shape == (16, 16, 3)
  pixels = everything(test)["image"].reshape(-1, 3).tolist()
  assert {tuple(p) for p in pixels} == {(90, 90, 90), (255, 0, 0)}


def test_grayscale_folder_stays_single_channel(tmp_path):
  for cls in ("a", "b"):
    write_image(tmp_path / "train" / cls / "x.png", (9, 12), 200, mode="L")
  source = data.load_source(folder_config(tmp_path), "train")
  assert source.image_shape == (16, 16, 1)
  np.testing.assert_array_equal(everything(source)["image"], 200)
  mean, std = source.channel_mean_std()
  np.testing.assert_allclose(mean, [200.0])
  np.testing.assert_allclose(std, [0.0], atol=1e-3)


@pytest.mark.parametrize("contents", ["truncated", "garbage"])
def test_unreadable_image_is_named(image_folder, contents):
  bad = image_folder / "train" / "dog" / "bad.png"
  if contents == "truncated":
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, "PNG")
    bad.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  else:
    bad.write_text("this is not a png")
  source = data.load_source(folder_config(image_folder), "train")  # Files are read later.
  with pytest.raises(ValueError, match=f"Cannot read image {bad}: .* Replace or remove"):
    everything(source)


def test_empty_class_folder_is_named(image_folder):
  (image_folder / "train" / "empty").mkdir()
  with pytest.raises(ValueError, match=f"Class folder {image_folder / 'train' / 'empty'} "
                     "has no images"):
    data.load_source(folder_config(image_folder), "train")


def test_eval_class_missing_from_train(image_folder):
  write_image(image_folder / "test" / "fox" / "0.png", (8, 8), (1, 2, 3))
  with pytest.raises(ValueError, match=r"Classes \['fox'\] in .*test are not in the "
                     r"training split"):
    data.load_source(folder_config(image_folder), "test")


def test_folder_without_images_explains_layout(tmp_path):
  (tmp_path / "train").mkdir()
  with pytest.raises(FileNotFoundError,
                     match=r"No class folders in .*train: .*ROOT/SPLIT/CLASS"):
    data.load_source(folder_config(tmp_path), "train")
  write_image(tmp_path / "train" / "a" / "0.png", (8, 8), (1, 2, 3))
  with pytest.raises(FileNotFoundError, match=r"No folder .*validation: .*ROOT/SPLIT/CLASS"):
    data.load_source(folder_config(tmp_path), "validation")


# --- Training batches ------------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_order(mesh):
  source = indexed_source(100)
  runs = []
  for seed in (0, 0, 1):
    with data.train_iterator(source, batch_size=16, seed=seed, mesh=mesh) as batches:
      runs.append(labels_of(take(batches, 10)))
  np.testing.assert_array_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0], runs[2])


def test_each_epoch_is_a_permutation_and_batches_straddle_epochs(mesh):
  source = indexed_source(100)
  with data.train_iterator(source, batch_size=16, seed=3, mesh=mesh) as batches:
    labels = labels_of(take(batches, 25))  # 400 examples: 4 epochs, 100 % 16 != 0.
  epochs = labels.reshape(4, 100)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(epochs[1], pipeline.epoch_order(100, 3, 1))


def test_unshuffled_batches_are_in_order(mesh):
  with data.train_iterator(indexed_source(20), batch_size=8, seed=0, mesh=mesh,
                           shuffle=False) as batches:
    np.testing.assert_array_equal(labels_of(take(batches, 5)), np.arange(40) % 20)


def test_resume_yields_identical_batches(mesh):
  source = indexed_source(100)
  with data.train_iterator(source, batch_size=16, seed=7, mesh=mesh) as original:
    take(original, 7)
    state = json.loads(json.dumps(original.get_state()))
    expected = take(original, 5)
  assert state["step"] == 7
  with data.train_iterator(source, batch_size=16, seed=7, mesh=mesh) as restored:
    take(restored, 2)  # Restoring also rewinds an iterator that has run ahead.
    restored.set_state(state)
    resumed = take(restored, 5)
  with data.train_iterator(source, batch_size=16, seed=7, mesh=mesh,
                           start_step=state["step"]) as started:
    started_at = take(started, 5)
  for want, got, got_too in zip(expected, resumed, started_at):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
      np.testing.assert_array_equal(np.asarray(got_too[key]), np.asarray(want[key]))


def test_resume_from_another_run_is_refused(mesh):
  with data.train_iterator(indexed_source(100), batch_size=16, seed=7, mesh=mesh) as batches:
    state = batches.get_state() | {"seed": 8}
    with pytest.raises(ValueError, match="seed: saved 8, now 7"):
      batches.set_state(state)


def test_batches_are_sharded_over_devices(mesh):
  with data.train_iterator(indexed_source(100), batch_size=32, seed=0, mesh=mesh) as batches:
    batch = next(batches)
  assert jax.device_count() == 8
  for key, dtype in (("image", np.uint8), ("label", np.int32)):
    array = batch[key]
    assert isinstance(array, jax.Array) and array.dtype == dtype and array.shape[0] == 32
    assert array.sharding == parallel.batch_sharding(mesh)
    assert sorted(s.data.shape[0] for s in array.addressable_shards) == [4] * 8
  # Images follow their labels (pixel value = index % 256 = label here).
  np.testing.assert_array_equal(np.asarray(batch["image"])[:, 0, 0, 0],
                                np.asarray(batch["label"]))


def test_batch_size_must_divide_over_devices(mesh):
  with pytest.raises(ValueError, match=r"config.batch_size=12 does not divide evenly over 8 "
                     r"devices.*use a multiple of 8, e.g. 8 or 16"):
    data.train_iterator(indexed_source(100), batch_size=12, seed=0, mesh=mesh)


def test_process_slices_cover_the_global_batch():
  positions = pipeline.global_batch_positions(step=3, batch_size=64)
  np.testing.assert_array_equal(positions, np.arange(192, 256))
  for count in (1, 2, 4, 8):
    parts = [pipeline.process_slice(positions, p, count) for p in range(count)]
    assert all(len(part) == 64 // count for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), positions)
  np.testing.assert_array_equal(pipeline.process_slice(positions, 1, 4), np.arange(208, 224))
  with pytest.raises(ValueError, match="A batch of 64 does not split over 3 processes"):
    pipeline.process_slice(positions, 0, 3)


def test_closing_stops_the_input_threads_and_workers(mesh):
  with data.train_iterator(indexed_source(100), batch_size=8, seed=0, mesh=mesh,
                           worker_count=1) as batches:
    next(batches)  # grain's first workers start a thread pool it keeps for all later ones.
  threads_before = len(threading.enumerate())
  for workers in (0, 1, 0, 1):
    batches = data.train_iterator(indexed_source(100), batch_size=8, seed=0, mesh=mesh,
                                  worker_count=workers)
    next(batches)
    assert len(multiprocessing.active_children()) == workers
    batches.close()
    evaluation = iter(data.eval_batches(indexed_source(100), batch_size=8, mesh=mesh,
                                        worker_count=workers))
    next(evaluation)
    evaluation.close()  # Abandoned half way.
    assert not multiprocessing.active_children()
  deadline = time.monotonic() + 10  # grain's threads notice the close within moments.
  while len(threading.enumerate()) > threads_before and time.monotonic() < deadline:
    time.sleep(0.1)
  assert len(threading.enumerate()) == threads_before


def photo_batches(config, mesh, workers: int, start_step: int = 0, steps: int = 3):
  source = data.load_source(config, "train")
  with data.train_iterator(source, batch_size=8, seed=5, mesh=mesh, start_step=start_step,
                           worker_count=workers) as batches:
    return [{k: np.asarray(v) for k, v in b.items()} for b in take(batches, steps)]


def test_photo_crops_are_the_same_with_workers_and_after_resume(image_folder, mesh):
  config = folder_config(image_folder)
  config.aug.crop, config.aug.flip = "inception", True
  in_process = photo_batches(config, mesh, workers=0)
  with_workers = photo_batches(config, mesh, workers=2)
  resumed = photo_batches(config, mesh, workers=1, start_step=1, steps=2)
  for want, got in zip(in_process, with_workers):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  for want, got in zip(in_process[1:], resumed):
    np.testing.assert_array_equal(got["image"], want["image"])
  # Random crops: the 13 images come round again in batch 2 with other crops.
  assert in_process[0]["image"].shape == (8, 16, 16, 3)
  train = data.load_source(config, "train")
  assert train.host_crops and data.for_device(config, True).aug.crop == "none"
  evaluation = data.eval_batches(train, batch_size=8, mesh=mesh, worker_count=2)
  batches = list(evaluation)
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  np.testing.assert_array_equal(np.concatenate([np.asarray(b["image"]) for b in batches])[mask],
                                everything(train)["image"])


def test_corrupt_jpeg_in_a_worker_is_named_and_does_not_hang(image_folder, mesh):
  bad = image_folder / "train" / "dog" / "bad.jpg"
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      buffer, "JPEG")
  bad.write_bytes(buffer.getvalue()[:200])
  source = data.load_source(folder_config(image_folder), "train")
  start = time.monotonic()
  with data.train_iterator(source, batch_size=8, seed=0, mesh=mesh, worker_count=1) as batches:
    with pytest.raises(errors.DataError, match=f"Cannot read image {bad}: .* Replace or remove"):
      take(batches, 4)  # 32 examples: every file at least twice.
  assert time.monotonic() - start < 120
  assert not multiprocessing.active_children()


def test_input_throughput_in_memory(mesh):
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 256, (50_000, 32, 32, 3), np.uint8),
                            rng.integers(0, 100, 50_000), class_names=list("x" * 100))
  rate = data.measure_input_throughput(source, make_config(batch_size=256), mesh,
                                       num_batches=20)
  assert rate > 2000  # The CPU model step takes ~40 images/s.


# --- Evaluation batches ----------------------------------------------------------------------


def test_eval_counts_every_example_once(mesh):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 10, 1003)
  images = rng.integers(1, 256, (1003, 4, 4, 3), np.uint8)  # Nonzero, unlike the padding.
  source = data.ArraySource(images, labels, class_names=list("abcdefghij"))
  evaluation = data.eval_batches(source, batch_size=256, mesh=mesh)
  assert (len(evaluation), evaluation.num_examples) == (4, 1003)
  for _ in range(2):  # Re-iterable: one pass per evaluation.
    batches = list(evaluation)
    assert len(batches) == 4
    assert batches[-1]["mask"].sharding == parallel.batch_sharding(mesh)
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    image = np.concatenate([np.asarray(b["image"]) for b in batches])
    assert mask.dtype == bool and mask.sum() == 1003 and not mask[1003:].any()
    np.testing.assert_array_equal(labels_of(batches)[mask], labels)
    np.testing.assert_array_equal(image[mask], images)
    assert not image[~mask].any()


def test_eval_batch_size_must_divide_over_devices(mesh):
  with pytest.raises(ValueError, match=r"config.eval_batch_size=100 does not divide"):
    data.eval_batches(indexed_source(10), batch_size=100, mesh=mesh)


def test_channel_mean_std_exact():
  images = np.zeros((4, 2, 2, 3), np.uint8)
  images[..., 0] = 10
  images[:2, ..., 1] = 255  # Half 255, half 0: mean 127.5, std 127.5.
  images[..., 2] = np.arange(4, dtype=np.uint8)[:, None, None] * 2  # 0, 2, 4, 6.
  mean, std = data.ArraySource(images, np.zeros(4), class_names=["a"]).channel_mean_std()
  assert mean.dtype == std.dtype == np.float32
  np.testing.assert_allclose(mean, [10, 127.5, 3])
  np.testing.assert_allclose(std, [0, 127.5, np.sqrt(5)], rtol=1e-6)


def test_normalization_stats_read_the_data_for_dataset_normalization_only(monkeypatch):
  source = indexed_source(8)
  reads = []
  monkeypatch.setattr(source, "channel_mean_std", lambda: reads.append(1) or ("m", "s"))
  config = make_config()
  assert data.normalization_stats(config, source) == ("m", "s") and reads == [1]
  config.aug.normalize = "minus_one_one"  # x -> (x - 127.5) / 127.5, the data unread.
  np.testing.assert_array_equal(data.normalization_stats(config, source), np.full((2, 3), 127.5))
  config.aug.normalize = "imagenet"
  mean, std = data.normalization_stats(config, source)
  np.testing.assert_allclose(mean, [123.675, 116.28, 103.53])
  np.testing.assert_allclose(std, [58.395, 57.12, 57.375])
  assert reads == [1]
