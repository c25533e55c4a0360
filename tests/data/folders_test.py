"""Image folders as pixel-space datasets (jdit.data.folders)."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jdit import data
from jdit import train as train_lib
from jdit.data import imagenet

CLASSES = ("b_dog", "a_cat", "c_fox")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("pets")
  rng = np.random.default_rng(0)
  for name in CLASSES:
    os.makedirs(root / name)
    for i, (w, h) in enumerate([(40, 32), (32, 48), (36, 36)]):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
          root / name / f"{i}.png")
  return root


def test_labelled_and_unlabeled_specs_and_batches(folder):
  spec = data.get_spec("folder32", str(folder))
  assert (spec.shape, spec.num_classes) == ((32, 32, 3), 3)
  source = data.load_source("folder32", "train", str(folder))
  batch = data.InputPipeline(source, spec, global_batch_size=9,
                             seed=0).batch(0)
  # Every image once per epoch, ADM-cropped, in [-1, 1], labelled by the
  # sorted class directories.
  assert sorted(batch["y"].tolist()) == [0] * 3 + [1] * 3 + [2] * 3
  paths = imagenet.ImageFolder(str(folder), 32).paths
  crops = {p: imagenet.center_crop_arr(Image.open(p), 32) / 127.5 - 1
           for p in paths}
  for x, y in zip(batch["x"], batch["y"]):
    matches = [p for p, c in crops.items() if np.allclose(c, x, atol=1e-6)]
    assert len(matches) == 1 and os.path.basename(
        os.path.dirname(matches[0])) == sorted(CLASSES)[y]
  unlabeled = data.get_spec("folder32_unlabeled", str(folder))
  assert unlabeled.num_classes == 1
  source = data.load_source("folder32_unlabeled", "train", str(folder))
  assert len(source) == 9 and set(source.labels) == {0}


def test_errors_name_the_dataset(folder, tmp_path):
  with pytest.raises(ValueError, match="'folder64' needs config.data"):
    data.get_spec("folder64", "")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_spec("folder64", str(tmp_path / "missing"))
  Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
  with pytest.raises(ValueError, match="'folder64_unlabeled'"):
    data.get_spec("folder64", str(tmp_path))
  with pytest.raises(ValueError, match="has no validation/ directory"):
    data.load_source("folder64", "validation", str(folder))


def test_a_pixel_model_trains_on_a_folder(folder, tiny_config, tmp_path):
  c = tiny_config
  c.data.name, c.data.data_dir, c.data.flip = "folder32", str(folder), True
  c.model.update(input_size=32, in_channels=3, num_classes=3, patch_size=8)
  c.batch_size, c.total_steps, c.sample.per_class = 8, 2, 0
  # One device: compiles faster than 8, and sharding is tested elsewhere.
  train_lib.run(c, str(tmp_path), devices=jax.devices()[:1])
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["step"] == 2
  assert all(np.isfinite(r["loss"]) for r in rows)
