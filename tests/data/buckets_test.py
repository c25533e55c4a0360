"""Aspect-ratio buckets: shapes, assignment, crops, the batch schedule,
bucketed latent extraction and training on it."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jdit import data
from jdit import sampling as sampling_lib
from jdit import train as train_lib
from jdit.data import buckets, extract_latents, imagenet
from jdit.data.pipeline import DatasetSpec, uint8_images
from tests.conftest import tiny_vae


def test_aspect_buckets_by_hand():
  # Area <= 32^2 in steps of 8: h = 32 -> w = 32; h = 24 -> w = 40 (1024 //
  # 24 = 42 -> 40); h = 16 -> w = 64 is wider than 2:1, so it stops there.
  assert buckets.aspect_buckets(32, 8) == [(40, 24), (32, 32), (24, 40)]
  assert buckets.aspect_buckets(32, 8, max_aspect=4) == [
      (64, 16), (40, 24), (32, 32), (24, 40), (16, 64)]
  assert buckets.aspect_buckets(32, 32) == [(32, 32)]


@pytest.mark.parametrize("size,step,max_aspect", [(256, 16, 2.0),
                                                  (512, 32, 3.0)])
def test_aspect_buckets_properties(size, step, max_aspect):
  shapes = buckets.aspect_buckets(size, step, max_aspect)
  assert (size, size) in shapes
  assert set(shapes) == {(w, h) for h, w in shapes}  # tall and wide alike
  ratios = [w / h for h, w in shapes]
  assert ratios == sorted(ratios)
  for h, w in shapes:
    assert h % step == 0 and w % step == 0
    assert h * w <= size * size < h * (w + step)  # the widest that fits
    assert 1 / max_aspect <= w / h <= max_aspect


def test_bucket_arguments():
  assert buckets.parse_buckets("256x256, 192x320") == [(256, 256), (192, 320)]
  for bad in ("256", "256x", "0x256", "256x256,256x256", "auto"):
    with pytest.raises(ValueError, match="--buckets"):
      buckets.parse_buckets(bad)
  with pytest.raises(ValueError, match="multiple of the bucket step"):
    buckets.aspect_buckets(250, 16)
  with pytest.raises(ValueError, match="max_aspect"):
    buckets.aspect_buckets(256, 16, 0.5)
  with pytest.raises(ValueError, match="20x32: sides must be multiples"):
    buckets.check_buckets([(32, 32), (20, 32)], 8)


def test_nearest_bucket():
  shapes = [(40, 24), (32, 32), (24, 40)]  # ratios w/h 0.6, 1, 1.67
  sizes = [(500, 300), (300, 500), (400, 390), (1000, 100), (100, 1000),
           (390, 500)]  # (width, height)
  assert buckets.nearest_bucket(sizes, shapes).tolist() == [2, 0, 1, 2, 0, 1]
  with pytest.raises(ValueError, match="positive"):
    buckets.nearest_bucket([(0, 5)], shapes)


def test_cover_crop():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), np.uint8))
  # The same aspect ratio: a plain resize, nothing cut.
  np.testing.assert_array_equal(
      imagenet.cover_crop(image, 18, 30),
      np.asarray(image.resize((30, 18), resample=Image.BICUBIC)))
  # Taller box than the image's ratio: scale to the height, cut the sides.
  out = imagenet.cover_crop(image, 30, 30)
  np.testing.assert_array_equal(out, np.asarray(image)[:, 10:40])
  np.testing.assert_array_equal(out, imagenet.center_crop_arr(image, 30))
  # 4x larger in both sides: two box halvings, then the crop.
  big = image.resize((200, 120), resample=Image.NEAREST)
  halved = big.resize((100, 60), Image.BOX).resize((50, 30), Image.BOX)
  np.testing.assert_array_equal(imagenet.cover_crop(big, 30, 40),
                                np.asarray(halved)[:, 5:45])
  with pytest.raises(ValueError, match="image size must be >= 1"):
    imagenet.cover_crop(image, 0, 4)


class _Source:
  """n examples whose label is `base` + index and whose image is filled
  with the index, of one shape."""

  def __init__(self, shape, n, base):
    self.shape, self.n, self.base = shape, n, base

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.__getitems__([i])[0]

  def __getitems__(self, indices):
    return [{"image": np.full(self.shape, i, np.uint8),
             "label": np.int64(self.base + i)} for i in indices]


SHAPES = ((4, 6, 1), (5, 5, 1), (6, 4, 1), (2, 8, 1))
SIZES = (16, 24, 8, 3)  # batches of 8: 2, 3, 1 and (skipped) 0 per epoch


def _pipeline(process_index=0, process_count=1, seed=3):
  spec = DatasetSpec("fake", SHAPES[1], 1000, uint8_images, buckets=SHAPES)
  sources = [_Source(s, n, 100 * b) for b, (s, n)
             in enumerate(zip(SHAPES, SIZES))]
  return data.make_pipeline(sources, spec, global_batch_size=8, seed=seed,
                            process_index=process_index,
                            process_count=process_count)


def test_bucketed_pipeline_epochs():
  pipe = _pipeline()
  assert isinstance(pipe, data.BucketedPipeline)
  assert pipe.skipped == [(SHAPES[3], 3)] and pipe.steps_per_epoch == 6
  for epoch in range(2):
    seen = {}
    for step in range(6 * epoch, 6 * epoch + 6):
      batch = pipe.batch(step)
      bucket = int(batch["y"][0]) // 100
      assert batch["x"].shape == (8,) + SHAPES[bucket]
      assert all(int(y) // 100 == bucket for y in batch["y"])
      assert pipe.locate(step)[0] == bucket
      seen.setdefault(bucket, []).extend(batch["y"].tolist())
    # Each epoch: every example of a bucket that is a whole number of
    # batches exactly once, and one batch of distinct examples of the rest.
    assert sorted(seen[0]) == list(range(16))
    assert sorted(seen[1]) == list(range(100, 124))
    assert len(set(seen[2])) == 8 and 3 not in seen
  orders = [[pipe.locate(s)[0] for s in range(6 * e, 6 * e + 6)]
            for e in range(3)]
  assert orders[0] != orders[1] or orders[1] != orders[2]  # reshuffled


def test_bucketed_pipeline_resumes_and_splits_over_hosts():
  whole = _pipeline()
  batches = [whole.batch(s) for s in range(14)]
  resumed = _pipeline()
  for step in (9, 3, 13):  # any step, in any order: a pure function of it
    b = resumed.batch(step)
    np.testing.assert_array_equal(b["x"], batches[step]["x"])
    np.testing.assert_array_equal(b["y"], batches[step]["y"])
  hosts = [_pipeline(h, 2) for h in range(2)]
  for step in range(14):
    parts = [h.batch(step) for h in hosts]
    np.testing.assert_array_equal(
        np.concatenate([p["y"] for p in parts]), batches[step]["y"])
  other = _pipeline(seed=4)
  assert any(not np.array_equal(other.batch(s)["y"], batches[s]["y"])
             for s in range(6))


def test_bucketed_pipeline_bad_input():
  spec = DatasetSpec("fake", SHAPES[0], 1000, uint8_images, buckets=SHAPES)
  few = [_Source(s, 3, 0) for s in SHAPES]
  with pytest.raises(ValueError, match="no bucket holds a whole batch of 8"):
    data.make_pipeline(few, spec, global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="3 sources for 4 buckets"):
    data.make_pipeline(few[:3], spec, global_batch_size=8, seed=0)


# Bucketed extraction and training: 32^2-area buckets in steps of 8 (the
# tiny VAE's factor): 40x24, 32x32, 24x40 pixels -> 5x3, 4x4, 3x5 latents.
AUTO_BUCKETS = [(40, 24), (32, 32), (24, 40)]
FOLDER_SIZES = {"tall": (36, 60), "square": (40, 38), "wide": (60, 36)}


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixed")
  rng = np.random.default_rng(0)
  for c in ("n01_a", "n02_b", "n03_c"):
    os.makedirs(root / c)
    for kind, (w, h) in FOLDER_SIZES.items():
      for j in range(2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
            root / c / f"{kind}{j}.png")
  vae_dir = str(tmp_path_factory.mktemp("vae"))
  module, params = tiny_vae(vae_dir, 32)
  out = str(tmp_path_factory.mktemp("latents") / "buckets")
  extract_latents.main(_extract_args(str(root), vae_dir, out))
  return str(root), out, module, params, vae_dir


def _extract_args(folder, vae_dir, out):
  return ["--source", "folder", "--folder", folder, "--image_size", "32",
          "--vae", vae_dir, "--out", out, "--batch_size", "8", "--dtype",
          "float32", "--buckets", "auto", "--bucket_step", "8",
          "--store_images"]


def test_extract_latents_into_buckets(bucketed):
  root, out, module, params, _ = bucketed
  with open(os.path.join(out, buckets.BUCKETS_FILE)) as f:
    info = json.load(f)
  # 2 images of each kind per class: 6 per bucket, 12 examples with flips.
  assert [(b["name"], b["image_size"], b["latent_shape"], b["num_images"],
           b["num_examples"]) for b in info["buckets"]] == [
               ("40x24", [40, 24], [5, 3, 4], 6, 12),
               ("32x32", [32, 32], [4, 4, 4], 6, 12),
               ("24x40", [24, 40], [3, 5, 4], 6, 12)]
  assert info["num_images"] == 18
  # Example 2k of a bucket is its k-th image (folder order), cropped to the
  # bucket and encoded; 2k + 1 its mirror.
  folder = imagenet.ImageFolder(root, 32, workers=1)
  tall = [i for i, p in enumerate(folder.paths) if "tall" in p]
  source = data.load_source("latents", "train", out)[0]  # 40x24
  for k in (0, 5):
    crop = imagenet.cover_crop(Image.open(folder.paths[tall[k]]), 40, 24)
    x = np.stack([crop, crop[:, ::-1]]).astype(np.float32) / 127.5 - 1
    mean, _ = module.apply({"params": params}, x, method="encode")
    for j in range(2):
      ex = source[2 * k + j]
      np.testing.assert_allclose(ex["latent_mean"], mean[j], atol=1e-4)
      assert ex["label"] == folder.labels[tall[k]]
  spec = data.get_spec("latents", out)
  assert spec.buckets == ((5, 3, 4), (4, 4, 4), (3, 5, 4))
  assert spec.num_classes == 3 and spec.shape == (4, 4, 4)
  assert [len(s) for s in data.load_source("latents", "train", out)] == [
      12, 12, 12]
  # One bucket is a latent dataset of its own.
  assert data.get_spec("latents", os.path.join(out, "24x40")).shape == (
      3, 5, 4)


def test_two_hosts_write_the_same_buckets(bucketed, monkeypatch, tmp_path):
  # Two hosts in one process: host 0 stops at the barrier after writing its
  # image sizes while host 1 runs whole (its barriers pass: host 0's part
  # is on disk, or host 1 does not need it); then host 0 finishes.
  root, one_host, _, _, vae_dir = bucketed
  out = str(tmp_path / "two")
  host = [0]
  monkeypatch.setattr(jax, "process_index", lambda: host[0])
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def barrier(name):
    if name == "extract_latents_sizes" and host[0] == 0:
      host[0] = 1
      extract_latents.main(_extract_args(root, vae_dir, out))
      host[0] = 0

  monkeypatch.setattr(extract_latents, "_sync", barrier)
  extract_latents.main(_extract_args(root, vae_dir, out))
  for name in ("40x24", "32x32", "24x40"):
    a = tfds.builder_from_directory(os.path.join(one_host, name))
    b = tfds.builder_from_directory(os.path.join(out, name))
    a, b = a.as_data_source("train"), b.as_data_source("train")
    assert len(a) == len(b) == 12
    for i in range(12):
      np.testing.assert_allclose(a[i]["latent_mean"], b[i]["latent_mean"],
                                 atol=1e-5)
      assert a[i]["label"] == b[i]["label"]
  with open(os.path.join(out, buckets.BUCKETS_FILE)) as f:
    assert [b["num_examples"] for b in json.load(f)["buckets"]] == [12] * 3
  assert not [f for f in os.listdir(out) if f.endswith(".npy")]


def _config(tiny_config, out):
  c = tiny_config
  c.data.name, c.data.data_dir = "latents", out
  c.model.update(input_size=4, in_channels=4, num_classes=3, patch_size=1)
  c.batch_size, c.total_steps, c.checkpoint_every = 8, 3, 2
  c.objective = "flow"  # its train step compiles faster than DDPM's
  return c


def test_trains_on_buckets_and_resumes_exactly(bucketed, tiny_config,
                                               tmp_path):
  c = _config(tiny_config, bucketed[1])
  straight, resumed = tmp_path / "a", tmp_path / "b"
  one = jax.devices()[:1]  # compiles faster than 8 devices, and suffices
  train_lib.run(c, str(straight), devices=one)
  # Resume from the step-2 checkpoint in another workdir (as if the run
  # had stopped there): step 3 repeats exactly.
  shutil.copytree(straight / "checkpoints" / "2",
                  resumed / "checkpoints" / "2")
  train_lib.run(c, str(resumed), devices=one)
  rows = lambda d: [(r["step"], r["loss"]) for r in map(
      json.loads, open(d / "metrics.jsonl"))]
  assert [s for s, _ in rows(straight)] == [1, 2, 3]
  assert rows(resumed) == rows(straight)[2:]
  assert all(np.isfinite(loss) for _, loss in rows(straight))
  # Steps 1-3 are one epoch: one batch of each bucket, each shape once.
  spec = data.get_spec("latents", bucketed[1])
  pipe = data.make_pipeline(data.load_source("latents", "train", bucketed[1]),
                            spec, global_batch_size=8, seed=c.seed)
  assert sorted(pipe.batch(s)["x"].shape[1:] for s in range(3)) == sorted(
      spec.buckets)


def test_buckets_that_do_not_fit_fail_before_training(bucketed, tiny_config,
                                                      tmp_path):
  c = _config(tiny_config, bucketed[1])
  c.model.patch_size = 2  # 5x3 latents do not split into 2x2 patches
  with pytest.raises(ValueError, match=r"bucket \(5, 3, 4\) of dataset "
                     r"'latents' does not fit model"):
    train_lib.run(c, str(tmp_path / "a"))
  c = _config(tiny_config, bucketed[1])
  with c.unlocked():  # the digits default has no distill section
    c.distill = {"teacher": str(tmp_path / "teacher")}
  with pytest.raises(ValueError, match="aspect-ratio buckets; "
                     "config.distill and config.depth_prune"):
    train_lib.run(c, str(tmp_path / "b"))
  assert os.listdir(tmp_path / "a") == os.listdir(tmp_path / "b") == []
  out = str(tmp_path / "c")
  with pytest.raises(ValueError, match="20x40: sides must be multiples"):
    extract_latents.main(["--source", "folder", "--folder", bucketed[0],
                          "--vae", bucketed[4], "--out", out,
                          "--buckets", "32x32,20x40"])
  assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_repa_on_buckets_sees_each_buckets_image(bucketed, tiny_config,
                                                  tmp_path):
  """REPA's DINOv2 reads each bucket's stored image at the bucket's token
  grid x 14 pixels: one target per token, whatever the aspect ratio."""
  torch = pytest.importorskip("torch")
  from jdit import convert_dinov2, repa  # pylint: disable=g-import-not-at-top
  from tests.dinov2_test import _torch_model  # pylint: disable=g-import-not-at-top  # pylint: disable=g-import-not-at-top
  encoder_file = str(tmp_path / "dinov2_tiny.pth")
  torch.save(_torch_model().state_dict(), encoder_file)
  c = _config(tiny_config, bucketed[1])
  c.repa.update(weight=0.5, encoder=encoder_file, dim=128, depth=1,
                projector_dim=16)
  c.total_steps = 1  # one bucket's step: each shape compiles for seconds
  spec = data.get_spec("latents", bucketed[1])
  pipe = data.make_pipeline(data.load_source("latents", "train", bucketed[1]),
                            spec, global_batch_size=8, seed=c.seed)
  assert pipe.batch(0)["x"].shape[1] != pipe.batch(0)["x"].shape[2]
  train_lib.run(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  (row,) = [json.loads(line) for line in open(tmp_path / "run" /
                                              "metrics.jsonl")]
  assert 0 < row["repa_loss"] <= 1.0, row
  # Every bucket: one target row per token, from its own image.
  encoder, params = convert_dinov2.load_dinov2(encoder_file)
  model, _ = sampling_lib.model_from_config(c)
  source = data.load_source("latents", "train", bucketed[1])
  for bucket, (h, w, _) in zip(source, spec.buckets):
    image = np.stack([bucket[i]["image"] for i in range(2)])
    assert image.shape[1:3] == (8 * h, 8 * w)  # the tiny VAE's factor
    target_fn = repa.make_target_fn(encoder, model.clone(input_size=(h, w)))
    target = jax.eval_shape(lambda p, i, f=target_fn: f(p, None, i),
                            params, image)
    assert target.shape == (2, h * w, 128)
