"""A stopped latent extraction resumes after its last closed shard and
writes the dataset an uninterrupted run writes."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jdit.data import extract_latents, latent_shards, latents
from tests.conftest import tiny_vae

SIZE, CLASSES, PER_CLASS = 16, 2, 5  # 10 images, 20 examples with mirrors


class Preempted(Exception):
  pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for c in range(CLASSES):
    os.makedirs(root / f"class{c}")
    for i in range(PER_CLASS):
      Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(
          root / f"class{c}" / f"{i}.png")
  vae_dir = str(tmp_path_factory.mktemp("vae"))
  tiny_vae(vae_dir, SIZE)
  return str(root), vae_dir


def _args(setup, out, **flags):
  folder, vae_dir = setup
  # Shards of 6 examples (3 images and their mirrors), 2 images an encode.
  flags = {"--source": "folder", "--folder": folder, "--image_size":
           str(SIZE), "--vae": vae_dir, "--out": str(out), "--batch_size":
           "4", "--dtype": "float32", "--examples_per_shard": "6",
           "--store_images": None, **flags}
  return [a for k, v in flags.items() for a in ((k,) if v is None
                                                else (k, v))]


def _count_encodes(monkeypatch, stop_at=None):
  """Counts encoder calls; raises Preempted on call `stop_at`. One device:
  batches are not rounded up to a multiple of the 8 test devices."""
  calls = []
  make = extract_latents.make_encoder

  def counting(module, params):
    encode, ndev = make(module, params, devices=jax.devices()[:1])

    def wrapped(x):
      calls.append(len(x))
      if len(calls) == stop_at:
        raise Preempted
      return encode(x)
    return wrapped, ndev

  monkeypatch.setattr(extract_latents, "make_encoder", counting)
  return calls


def _stop_after_three_batches(setup, out, monkeypatch):
  """Encodes batches 1-3 and stops while dispatching the 4th: batches 1-2
  (4 images, 8 examples) were written, one closed shard of 6 and 2 examples
  of an open one."""
  _count_encodes(monkeypatch, stop_at=4)
  with pytest.raises(Preempted):
    extract_latents.main(_args(setup, out))
  monkeypatch.undo()
  tmp = str(out) + ".tmp"
  assert not os.path.exists(out)
  progress = latent_shards.read_json(latent_shards.progress_path(tmp, 0))
  assert progress["lengths"] == [6]
  assert os.path.exists(latent_shards.shard_path(tmp, 0, 1))  # cut off
  return tmp


def _examples(out):
  source = tfds.builder_from_directory(str(out)).as_data_source("train")
  return [source[i] for i in range(len(source))]


def test_resumed_run_writes_what_an_uninterrupted_one_does(setup, tmp_path,
                                                           monkeypatch):
  straight = tmp_path / "straight"
  calls = _count_encodes(monkeypatch)
  extract_latents.main(_args(setup, straight))
  assert len(calls) == 5  # 10 images, 2 an encode
  monkeypatch.undo()

  resumed = tmp_path / "resumed"
  _stop_after_three_batches(setup, resumed, monkeypatch)
  # The same command: only the 7 images after the closed shard are encoded.
  calls = _count_encodes(monkeypatch)
  extract_latents.main(_args(setup, resumed))
  assert len(calls) == 4

  assert sorted(os.listdir(resumed)) == sorted(os.listdir(straight))
  assert not os.path.exists(str(resumed) + ".tmp")
  a, b = _examples(straight), _examples(resumed)
  assert len(a) == len(b) == 2 * CLASSES * PER_CLASS
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  with open(straight / latents.STATS_FILE) as f, \
       open(resumed / latents.STATS_FILE) as g:
    want, got = json.load(f), json.load(g)
  want.pop("vae"), got.pop("vae")
  assert got == want  # the moments' sums, added in the same order


def test_other_settings_are_refused_until_restart(setup, tmp_path,
                                                  monkeypatch):
  out = tmp_path / "out"
  tmp = _stop_after_three_batches(setup, out, monkeypatch)
  before = sorted(os.listdir(tmp))
  with pytest.raises(ValueError, match=r"other settings \(dtype: 'float32' "
                     r"then, 'float16' now\).*--restart"):
    extract_latents.main(_args(setup, out, **{"--dtype": "float16"}))
  assert sorted(os.listdir(tmp)) == before  # nothing discarded
  calls = _count_encodes(monkeypatch)
  extract_latents.main(_args(setup, out, **{"--dtype": "float16",
                                            "--restart": None}))
  assert len(calls) == 5  # from the start
  assert all(ex["latent_mean"].dtype == np.float16 for ex in _examples(out))


def test_shards_must_keep_an_image_with_its_mirror(setup, tmp_path):
  with pytest.raises(ValueError, match="--examples_per_shard must be a "
                     "positive multiple of 2.*got 5"):
    extract_latents.main(_args(setup, tmp_path / "x",
                               **{"--examples_per_shard": "5"}))
  assert not os.path.exists(tmp_path / "x.tmp")
