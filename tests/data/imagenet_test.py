"""ImageNet path: ADM crops, the image folder, latent extraction, training."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jdit import data, vae
from jdit import train as train_lib
from jdit.data import extract_latents, imagenet, latents
from tests.conftest import tiny_vae

NUM_CLASSES, PER_CLASS, SIZE = 3, 4, 32
CLASS_DIRS = ("n02_dog", "n01_cat", "n03_fox")  # label = sorted position


def _image(seed, w=SIZE, h=SIZE):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))


def _adm_center_crop_arr(pil_image, image_size):
  """ADM's center_crop_arr (openai/guided-diffusion, image_datasets.py),
  restated here independently of jdit's, after the RGB conversion that ADM's
  and DiT's loaders apply first."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size),
                                 resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@pytest.mark.parametrize("w,h,size", [
    (600, 300, 64),    # two BOX halvings, then BICUBIC up to 64 rows
    (500, 375, 256),   # ImageNet's typical shape at DiT's 256: no halving
    (500, 375, 64),    # 375 -> 187 -> 93: two halvings, odd sides
    (333, 999, 32),    # portrait, many halvings
    (257, 255, 128),   # barely not >= 2x: BICUBIC only
    (40, 90, 64),      # smaller than the crop: BICUBIC upsampling
])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_center_crop_matches_adm(w, h, size, mode):
  img = _image(w * h + size, w=w, h=h).convert(mode)
  out = imagenet.center_crop_arr(img, size)
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, _adm_center_crop_arr(img.convert("RGB"),
                                                          size))


def test_center_crop_matches_hand_computed_steps():
  img = _image(0, w=600, h=300)
  # short side 300 >= 2*64 -> 300x150 -> 150x75 (75 < 128 stops the BOX
  # halving); BICUBIC to short side 64 -> 128x64; centre columns 32..96.
  ref = img.resize((300, 150), Image.BOX).resize((150, 75), Image.BOX)
  ref = np.asarray(ref.resize((128, 64), Image.BICUBIC))[:, 32:96]
  np.testing.assert_array_equal(imagenet.center_crop_arr(img, 64), ref)


def test_center_crop_picks_the_centre():
  # A tall 40x100 image: white rows 40..60 at its centre, short side already
  # the target size, so the crop is rows 30..70 of the unchanged image.
  arr = np.zeros((100, 40, 3), np.uint8)
  arr[40:60] = 255
  out = imagenet.center_crop_arr(Image.fromarray(arr), 40)
  np.testing.assert_array_equal(out, arr[30:70])
  # Smaller than the target: upsampled (BICUBIC) to fill the square.
  assert imagenet.center_crop_arr(_image(1, 10, 20), 16).shape == (16, 16, 3)
  flipped = imagenet.hflip(out[None])[0]
  np.testing.assert_array_equal(flipped, out[:, ::-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for c, name in enumerate(CLASS_DIRS):
    os.makedirs(root / name)
    for i in range(PER_CLASS):
      ext = "JPEG" if i % 2 else "png"
      # PNG only: JPEG is lossy, and the test compares decoded pixels.
      _image(10 * c + i).save(root / name / f"img{i}.{ext}", format="PNG")
  (root / "n01_cat" / "notes.txt").write_text("not an image")
  return str(root)


def test_image_folder_labels_from_sorted_class_dirs(folder, tmp_path):
  f = imagenet.ImageFolder(folder, SIZE, workers=2)
  assert f.classes == sorted(CLASS_DIRS) and f.num_classes == 3
  assert len(f) == NUM_CLASSES * PER_CLASS
  for path, label in zip(f.paths, f.labels):
    assert os.path.basename(os.path.dirname(path)) == f.classes[label]
  assert f.paths[0].endswith(os.path.join("n01_cat", "img0.png"))
  ex = f[5]
  np.testing.assert_array_equal(
      ex["image"], imagenet.center_crop_arr(Image.open(f.paths[5]), SIZE))
  assert ex["label"] == f.labels[5] == 1
  images, labels = next(f.batches(5))
  assert images.shape == (5, SIZE, SIZE, 3) and labels.tolist() == [0] * 4 + [1]
  parts = [list(f.batches(2, h, 5)) for h in range(5)]  # 5 hosts, 12 images
  labels = [lab for p in parts for _, labs in p for lab in labs]
  assert labels == f.labels
  with pytest.raises(FileNotFoundError, match="does not exist"):
    imagenet.ImageFolder(str(tmp_path / "missing"), SIZE)
  with pytest.raises(ValueError, match="no class subdirectories"):
    imagenet.ImageFolder(str(tmp_path), SIZE)
  (tmp_path / "n01").mkdir()
  with pytest.raises(ValueError, match="no images with extensions"):
    imagenet.ImageFolder(str(tmp_path), SIZE)
  (tmp_path / "n01" / "broken.JPEG").write_text("not an image")
  with pytest.raises(ValueError, match="cannot decode.*broken.JPEG"):
    imagenet.ImageFolder(str(tmp_path), SIZE)[0]


def test_unlabeled_folder_is_one_class_at_any_depth(folder, tmp_path):
  f = imagenet.ImageFolder(folder, SIZE, labels="none")
  assert f.classes == ["unlabeled"] and f.num_classes == 1
  assert f.paths == sorted(imagenet.ImageFolder(folder, SIZE).paths)
  assert f.labels == [0] * NUM_CLASSES * PER_CLASS
  np.testing.assert_array_equal(
      f[3]["image"], imagenet.center_crop_arr(Image.open(f.paths[3]), SIZE))
  # FFHQ-style shards and loose images alike; the flat folder that the
  # class-directory layout refuses points here.
  os.makedirs(tmp_path / "00000" / "deeper")
  _image(1).save(tmp_path / "top.png")
  _image(2).save(tmp_path / "00000" / "a.png")
  _image(3).save(tmp_path / "00000" / "deeper" / "b.JPEG", format="PNG")
  nested = imagenet.ImageFolder(str(tmp_path), SIZE, labels="none")
  assert [os.path.relpath(p, tmp_path) for p in nested.paths] == [
      os.path.join("00000", "a.png"), os.path.join("00000", "deeper",
                                                   "b.JPEG"), "top.png"]
  shutil.rmtree(tmp_path / "00000")
  with pytest.raises(ValueError, match="unlabeled images take labels='none'"):
    imagenet.ImageFolder(str(tmp_path), SIZE)
  (tmp_path / "top.png").unlink()
  with pytest.raises(ValueError, match="no images .* at any depth"):
    imagenet.ImageFolder(str(tmp_path), SIZE, labels="none")
  with pytest.raises(ValueError, match="labels must be one of"):
    imagenet.ImageFolder(folder, SIZE, labels="files")
  with pytest.raises(ValueError, match="applies to --source folder"):
    imagenet.open_source("imagenet2012", labels="none")


@pytest.fixture(scope="module")
def extracted(folder, tmp_path_factory):
  vae_dir = str(tmp_path_factory.mktemp("vae"))
  module, params = tiny_vae(vae_dir, SIZE)
  out = str(tmp_path_factory.mktemp("latents") / "tiny")
  args = ["--source", "folder", "--folder", folder, "--image_size",
          str(SIZE), "--vae", vae_dir, "--out", out, "--batch_size", "8",
          "--dtype", "float32", "--examples_per_shard", "10",
          "--store_images"]
  extract_latents.main(args)
  return out, module, params, args


def test_extract_latents_stores_both_orientations(extracted, folder):
  out, module, params, _ = extracted
  assert not os.path.exists(out + ".tmp")
  source = tfds.builder_from_directory(out).as_data_source("train")
  n = NUM_CLASSES * PER_CLASS
  assert len(source) == 2 * n
  f = imagenet.ImageFolder(folder, SIZE)
  images = np.stack([imagenet.center_crop_arr(Image.open(p), SIZE)
                     for p in f.paths])
  rows = np.concatenate([images, imagenet.hflip(images)])
  mean, logvar = jax.jit(lambda x: module.apply(
      {"params": params}, x, method="encode"))(imagenet.to_float(rows))
  std = np.exp(0.5 * np.asarray(logvar))
  for k in range(n):
    for copy, row in ((0, k), (1, n + k)):  # 2k original, 2k+1 mirrored
      ex = source[2 * k + copy]
      assert ex["latent_mean"].shape == (4, 4, 4)
      np.testing.assert_allclose(ex["latent_mean"], mean[row], atol=1e-5)
      np.testing.assert_allclose(ex["latent_std"], std[row], rtol=1e-5)
      assert ex["label"] == f.labels[k]
      np.testing.assert_array_equal(ex["image"], rows[row])  # --store_images
  assert not np.allclose(source[0]["latent_mean"], source[1]["latent_mean"])
  with open(os.path.join(out, latents.STATS_FILE)) as fh:
    stats = json.load(fh)
  assert stats["num_examples"] == 2 * n and stats["latent_shape"] == [4, 4, 4]
  assert stats["scale_factor"] == pytest.approx(vae.SD_VAE_SCALE_FACTOR)
  z_mean = np.asarray(mean).mean((0, 1, 2))
  np.testing.assert_allclose(stats["channel_mean"], z_mean, rtol=1e-4,
                             atol=1e-6)
  assert len(stats["channel_std"]) == 4


def test_extract_latents_bad_input(extracted, folder, tmp_path):
  out, _, _, args = extracted
  with pytest.raises(FileExistsError, match="--overwrite"):
    extract_latents.main(args)
  base = dict(zip(args[::2], args[1::2]))
  bad = lambda **kw: sum(([k, v] for k, v in {**base, **kw}.items()), [])
  new = str(tmp_path / "new")
  with pytest.raises(ValueError, match="cannot load the VAE from --vae"):
    extract_latents.main(bad(**{"--vae": str(tmp_path), "--out": new}))
  with pytest.raises(ValueError, match="multiple of the VAE's downsampling"):
    extract_latents.main(bad(**{"--image_size": "36", "--out": new}))
  with pytest.raises(FileNotFoundError, match="missing"):
    extract_latents.main(bad(**{"--folder": str(tmp_path / "missing"),
                                "--out": new}))
  assert not os.path.exists(new)
  with pytest.raises(ValueError, match=r"holds latents of shape \(4, 4, 4\)"):
    data.load_source("imagenet_latents", "train", out)
  with pytest.raises(FileNotFoundError, match="extract_latents"):
    data.load_source("imagenet_latents", "train", str(tmp_path))


@pytest.fixture
def tiny_latents(extracted):
  spec = latents.register("tiny_latents", SIZE, NUM_CLASSES)
  yield extracted[0], spec
  data.DATASETS.pop("tiny_latents")


def test_latent_batches_sample_the_moments_deterministically(tiny_latents):
  out, spec = tiny_latents
  source = data.load_source("tiny_latents", "train", out)
  pipe = lambda **kw: data.InputPipeline(source, spec, global_batch_size=8,
                                         seed=0, **kw)
  a, b = pipe().batch(3), pipe().batch(3)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert not np.array_equal(pipe().batch(4)["x"], a["x"])
  halves = [pipe(process_index=h, process_count=2).batch(3)["x"]
            for h in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a["x"])
  idx = pipe().indices(3)
  mean = np.stack([source[int(i)]["latent_mean"] for i in idx])
  std = np.stack([source[int(i)]["latent_std"] for i in idx])
  eps = (a["x"] / vae.SD_VAE_SCALE_FACTOR - mean) / std
  assert a["x"].shape == (8, 4, 4, 4) and a["x"].dtype == np.float32
  assert abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2


def test_pipeline_passes_stored_images(tiny_latents):
  # REPA on latents: batches carry the stored image of every latent.
  out, spec = tiny_latents
  source = data.load_source("tiny_latents", "train", out)
  pipe = data.InputPipeline(source, spec, global_batch_size=8, seed=0,
                            images=True)
  batch = pipe.batch(1)
  assert batch["image"].shape == (8, SIZE, SIZE, 3)
  for i, image in zip(pipe.indices(1), batch["image"]):
    np.testing.assert_array_equal(image, source[int(i)]["image"])
  assert "image" not in data.InputPipeline(source, spec, global_batch_size=8,
                                           seed=0).batch(1)


def test_latents_dataset_describes_itself(tiny_latents):
  # "latents" reads what register() was told from latent_stats.json, so both
  # give the same batches.
  out, spec = tiny_latents
  own = data.get_spec("latents", out)
  assert (own.shape, own.num_classes) == (spec.shape, spec.num_classes)
  assert own.to_model.keywords == spec.to_model.keywords
  batch = lambda name, s: data.InputPipeline(
      data.load_source(name, "train", out), s, global_batch_size=8,
      seed=0).batch(2)["x"]
  np.testing.assert_array_equal(batch("latents", own),
                                batch("tiny_latents", spec))
  with pytest.raises(ValueError, match="needs config.data.data_dir"):
    data.get_spec("latents")


def test_trains_on_latents_and_resumes_exactly(extracted, tiny_config,
                                               tmp_path):
  c = tiny_config
  c.data.name, c.data.data_dir = "latents", extracted[0]
  c.model.update(input_size=4, in_channels=4, num_classes=NUM_CLASSES)
  c.objective = "flow"  # LightningDiT's loss: MSE plus the cosine term
  c.diffusion.flow.cosine_loss = 1.0
  c.batch_size, c.total_steps = 8, 2
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  train_lib.run(c, straight)
  train_lib.run(c, resumed, stop_at=1)
  train_lib.run(c, resumed)
  rows = lambda d: [json.loads(l) for l in open(os.path.join(d,
                                                             "metrics.jsonl"))]
  assert [r["step"] for r in rows(straight)] == [1, 2]
  assert [(r["step"], r["loss"]) for r in rows(resumed)] == [
      (r["step"], r["loss"]) for r in rows(straight)]
  assert all(np.isfinite(r["loss"]) for r in rows(straight))
  assert all(0 < r["cosine"] < 2 for r in rows(straight))


@pytest.mark.parametrize("name,arg,side", [
    ("dit_imagenet256", None, 32), ("dit_imagenet512", None, 64),
    ("dit_imagenet256", "model=DiT-B/2,res=512", 64)])
def test_imagenet_configs_fit_their_datasets(name, arg, side):
  from jdit import sampling  # pylint: disable=g-import-not-at-top
  from jdit.config_util import load_config  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  c = load_config(os.path.join(root, "configs", f"{name}.py"), arg)
  model, _ = sampling.model_from_config(c)
  assert data.get_spec(c.data.name).shape == model.input_shape == (
      side, side, 4)
  assert model.learn_sigma and model.num_classes == 1000
  assert (c.batch_size, c.optim.lr, c.ema_decay) == (256, 1e-4, 0.9999)
  assert c.vae.scale_factor == data.get_spec(c.data.name).to_model.keywords[
      "scale_factor"]
  with pytest.raises(ValueError, match="bad option"):
    load_config(os.path.join(root, "configs", "dit_imagenet256.py"),
                "resolution=128")


def test_two_hosts_write_the_same_dataset(extracted, monkeypatch, tmp_path):
  # Simulates two hosts in one process: host 0 waits at the "written" barrier
  # while host 1 encodes its half; then host 0 merges and renames.
  one_host, _, _, args = extracted
  out = str(tmp_path / "two")
  args = args[:args.index("--out") + 1] + [out] + args[args.index("--out")
                                                      + 2:]
  host = [0]
  monkeypatch.setattr(jax, "process_index", lambda: host[0])
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def barrier(name):
    if name == "extract_latents_written" and host[0] == 0:
      host[0] = 1
      extract_latents.main(args)
      host[0] = 0

  monkeypatch.setattr(extract_latents, "_sync", barrier)
  extract_latents.main(args)
  a = tfds.builder_from_directory(one_host).as_data_source("train")
  b = tfds.builder_from_directory(out).as_data_source("train")
  assert len(b) == len(a) == 2 * NUM_CLASSES * PER_CLASS
  for i in range(len(a)):
    np.testing.assert_array_equal(a[i]["latent_mean"], b[i]["latent_mean"])
    assert a[i]["label"] == b[i]["label"]
  shards = [f for f in os.listdir(out) if ".array_record-" in f]
  assert len(shards) == 4  # 12 rows per host, 10 per shard
  with open(os.path.join(out, latents.STATS_FILE)) as fh:
    stats = json.load(fh)
  with open(os.path.join(one_host, latents.STATS_FILE)) as fh:
    np.testing.assert_allclose(stats["channel_std"],
                               json.load(fh)["channel_std"], rtol=1e-6)


def test_unconditional_latents_train(extracted, folder, tiny_config,
                                     tmp_path):
  """--labels none: one class; a model without label dropout trains on it
  and its end-of-run grid is sampled unguided."""
  # (the flag --store_images, last and valueless, falls out of the pairs)
  base = dict(zip(extracted[3][::2], extracted[3][1::2]))
  out = str(tmp_path / "ffhq")
  extract_latents.main(sum(([k, v] for k, v in {
      **base, "--out": out, "--labels": "none", "--flip": "none"}.items()),
                           []))
  stats = latents.read_stats(out)
  assert (stats["num_classes"], stats["num_examples"]) == (
      1, NUM_CLASSES * PER_CLASS)
  source = data.load_source("latents", "train", out)
  assert {int(source[i]["label"]) for i in range(len(source))} == {0}
  c = tiny_config
  c.data.name, c.data.data_dir = "latents", out
  c.model.update(input_size=4, in_channels=4, num_classes=1,
                 class_dropout_prob=0.0)
  c.batch_size, c.total_steps, c.sample.per_class = 8, 1, 2
  assert c.sample.cfg_scale > 1  # the default; no null class to guide with
  train_lib.run(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  with np.load(tmp_path / "run" / "samples_step1.npz") as f:
    assert f["arr_0"].shape[0] == 2 and set(f["arr_1"].tolist()) == {0}
