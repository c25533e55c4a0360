"""ImageNet from the ILSVRC tars (via TFDS) and from a folder, end to end:
files -> ADM centre crop -> flips -> batches by step, split over hosts.

The `ilsvrc` fixture is a miniature ILSVRC2012 as image-net.org ships it: a
train tar of per-class <wnid>.tar and a flat val tar of
ILSVRC2012_val_%08d.JPEG, with the two kinds of odd files tfds' builder re-encodes (a CMYK JPEG and a
PNG named .JPEG) under their real ImageNet names. The same files are also laid
out as train/<wnid>/ and val/<wnid>/ folders, and the tars are prepared into a
TFDS data dir by jdit.data.prepare_imagenet.
"""
import dataclasses
import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jdit import data
from jdit.data import imagenet, prepare_imagenet

# Real wnids (label ids 0, 59 and 230 of imagenet2012); the two odd files are
# the ones tfds lists in CMYK_IMAGES and PNG_IMAGES.
WNIDS = ("n01440764", "n01739381", "n02105855")
CMYK_FILE, PNG_FILE = "n01739381_1309.JPEG", "n02105855_2933.JPEG"
# (width, height): landscape, portrait, odd sides; some >= 2x the crop side
# so the BOX halving runs, some below it.
SIZES = ((200, 150), (150, 260), (97, 131), (300, 170))
# The first three validation images' wnids in tfds' validation_labels.txt.
VAL_WNIDS = ("n01751748", "n09193705", "n02105855")
SIDE = 64  # the registered imagenet64 dataset


@dataclasses.dataclass
class Ilsvrc:
  manual_dir: str     # ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar
  folder: str         # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
  tfds_dir: str       # imagenet2012 prepared by jdit.data.prepare_imagenet
  train: list         # (wnid, file name) of every training image
  val: list           # (wnid, file name) of every validation image


def image_bytes(seed: int, size, fmt: str = "JPEG", mode: str = "RGB"):
  """A smooth random image (so JPEG keeps it recognisable), encoded."""
  w, h = size
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), np.uint8)
  image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
  out = io.BytesIO()
  image.convert(mode).save(out, format=fmt, quality=95)
  return out.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def ilsvrc(tmp_path_factory) -> Ilsvrc:
  base = tmp_path_factory.mktemp("ilsvrc")
  manual, folder = base / "manual", base / "folder"
  manual.mkdir()
  train, val = [], []
  with tarfile.open(manual / prepare_imagenet.TRAIN_TAR, "w") as outer:
    for c, wnid in enumerate(WNIDS):
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for i, size in enumerate(SIZES):
          name = f"{wnid}_{i}.JPEG"
          data = image_bytes(10 * c + i, size)
          if i == 3 and wnid == CMYK_FILE.split("_")[0]:
            name, data = CMYK_FILE, image_bytes(99, size, mode="CMYK")
          if i == 3 and wnid == PNG_FILE.split("_")[0]:
            name, data = PNG_FILE, image_bytes(98, size, fmt="PNG")
          add_file(inner, name, data)
          os.makedirs(folder / "train" / wnid, exist_ok=True)
          (folder / "train" / wnid / name).write_bytes(data)
          train.append((wnid, name))
      add_file(outer, f"{wnid}.tar", inner_buf.getvalue())
  with tarfile.open(manual / prepare_imagenet.VAL_TAR, "w") as tar:
    for k, wnid in enumerate(VAL_WNIDS):
      name, data = f"ILSVRC2012_val_{k + 1:08d}.JPEG", image_bytes(50 + k,
                                                                  SIZES[k])
      add_file(tar, name, data)
      os.makedirs(folder / "val" / wnid, exist_ok=True)
      (folder / "val" / wnid / name).write_bytes(data)
      val.append((wnid, name))
  tfds_dir = base / "tfds"
  prepare_imagenet.prepare(str(manual), str(tfds_dir))
  return Ilsvrc(str(manual), str(folder), str(tfds_dir), train, val)



def _raw(ilsvrc, split="train"):
  """tfds' own reader over the prepared dataset, records as stored."""
  return tfds.data_source("imagenet2012", split=split,
                          data_dir=ilsvrc.tfds_dir,
                          decoders={"image": tfds.decode.SkipDecoding()})


def test_prepare_writes_tfds_imagenet2012_without_tensorflow(ilsvrc):
  # CI has no TensorFlow; where it is installed, nothing here imported it.
  assert "tensorflow" not in sys.modules
  builder = tfds.builder("imagenet2012", data_dir=ilsvrc.tfds_dir)
  assert builder.is_prepared()
  assert builder.info.file_format.value == "array_record"
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 12, "validation": 3}
  names = builder.info.features["label"].names
  assert len(names) == 1000 and names == sorted(names)
  train = _raw(ilsvrc)
  files = sorted(r["file_name"].decode() for r in train)
  assert files == sorted(f for _, f in ilsvrc.train)
  for r in train:
    assert names[r["label"]] == r["file_name"].decode().split("_")[0]
    with Image.open(io.BytesIO(r["image"])) as img:  # all RGB JPEGs now
      assert (img.format, img.mode) == ("JPEG", "RGB"), r["file_name"]
  val = {r["file_name"].decode(): names[r["label"]]
         for r in _raw(ilsvrc, "validation")}
  assert val == {f: w for w, f in ilsvrc.val}
  assert [w for w, _ in ilsvrc.val] == list(VAL_WNIDS)
  # A second call finds the dataset prepared and leaves it alone.
  before = {f: os.path.getmtime(os.path.join(builder.data_dir, f))
            for f in os.listdir(builder.data_dir)}
  prepare_imagenet.main(["--manual_dir", ilsvrc.manual_dir,
                         "--data_dir", ilsvrc.tfds_dir])
  assert before == {f: os.path.getmtime(os.path.join(builder.data_dir, f))
                    for f in os.listdir(builder.data_dir)}


def test_tfds_and_folder_give_the_same_crops(ilsvrc):
  tf_src = imagenet.TFDSImages("imagenet2012", ilsvrc.tfds_dir, "train", SIDE)
  folder = imagenet.ImageFolder(os.path.join(ilsvrc.folder, "train"), SIDE,
                                workers=2)
  assert folder.classes == list(WNIDS) and len(tf_src) == len(folder) == 12
  by_file = {os.path.basename(p): i for i, p in enumerate(folder.paths)}
  for i, raw in enumerate(_raw(ilsvrc)):
    name = raw["file_name"].decode()
    ours, ref = tf_src[i], folder[by_file[name]]
    assert ours["image"].shape == (SIDE, SIDE, 3)
    assert ours["image"].dtype == np.uint8
    assert tf_src.classes[ours["label"]] == folder.classes[ref["label"]]
    if name in (CMYK_FILE, PNG_FILE):  # re-encoded as JPEG by the builder
      diff = np.abs(ours["image"].astype(int) - ref["image"]).mean()
      assert 0 < diff < 3, (name, diff)
    else:  # the same JPEG bytes, decoded and cropped the same way
      np.testing.assert_array_equal(ours["image"], ref["image"], name)


@pytest.mark.parametrize("kind", ["tfds", "folder"])
def test_pipeline_batches_by_step_over_hosts(ilsvrc, kind):
  root = ilsvrc.tfds_dir if kind == "tfds" else ilsvrc.folder
  source = data.load_source("imagenet64", "train", root)
  assert isinstance(source, imagenet.TFDSImages if kind == "tfds"
                    else imagenet.ImageFolder)
  spec = data.get_spec("imagenet64")
  pipe = lambda **kw: data.InputPipeline(
      source, spec, global_batch_size=4, seed=kw.pop("seed", 0), flip=True,
      **kw)
  a = pipe()
  batches = [a.batch(step) for step in range(6)]  # two epochs of 12
  for step, b in enumerate(batches):
    assert b["x"].shape == (4, SIDE, SIDE, 3) and b["x"].dtype == np.float32
    assert b["y"].dtype == np.int32
    assert -1 <= b["x"].min() and b["x"].max() <= 1
    idx = a.indices(step)
    truth = [source[int(i)] for i in idx]
    np.testing.assert_array_equal(b["y"], [t["label"] for t in truth])
    for x, t, i in zip(b["x"], truth, idx):  # label ids name the wnid dir
      assert source.classes[t["label"]] in WNIDS
      plain = imagenet.to_float(t["image"])
      assert (np.array_equal(x, plain) or np.array_equal(x, plain[:, ::-1])), i
  flipped = [not np.array_equal(x, imagenet.to_float(source[int(i)]["image"]))
             for s in range(6) for x, i in zip(batches[s]["x"], a.indices(s))]
  assert 0 < sum(flipped) < len(flipped)
  # Each epoch visits every image once; the order is the seed's.
  for epoch in range(2):
    seen = np.concatenate([a.indices(s) for s in range(3 * epoch,
                                                       3 * epoch + 3)])
    assert sorted(seen.tolist()) == list(range(12))
  assert not np.array_equal(np.concatenate([a.indices(s) for s in range(3)]),
                            np.concatenate([a.indices(s) for s in range(3, 6)]))
  other = pipe(seed=1)
  assert not all(np.array_equal(other.indices(s), a.indices(s))
                 for s in range(3))
  # Resume: a fresh pipeline's batch k is the batch k of an uninterrupted run.
  for step in (4, 1):
    b = pipe().batch(step)
    np.testing.assert_array_equal(b["x"], batches[step]["x"])
    np.testing.assert_array_equal(b["y"], batches[step]["y"])
  # Two hosts: each reads its half of every global batch; the halves are
  # disjoint, and over an epoch they cover the dataset.
  hosts = [pipe(process_index=h, process_count=2) for h in range(2)]
  for step in range(3):
    parts = [h.batch(step) for h in hosts]
    assert parts[0]["x"].shape == (2, SIDE, SIDE, 3)
    np.testing.assert_array_equal(
        np.concatenate([p["x"] for p in parts]), batches[step]["x"])
  per_host = [set(np.concatenate([h.indices(s) for s in range(3)]).tolist())
              for h in hosts]
  assert not per_host[0] & per_host[1]
  assert per_host[0] | per_host[1] == set(range(12))


def test_validation_split_from_tfds_and_folder(ilsvrc):
  for root in (ilsvrc.tfds_dir, ilsvrc.folder):  # folder: val/<wnid>/
    source = data.load_source("imagenet64", "validation", root)
    assert len(source) == 3
    wnids = sorted(source.classes[source[i]["label"]] for i in range(3))
    assert wnids == sorted(VAL_WNIDS)


def test_hosts_extract_disjoint_slices(ilsvrc):
  source = imagenet.TFDSImages("imagenet2012", ilsvrc.tfds_dir, "train", 16)
  whole = list(source.batches(5))
  assert [len(labels) for _, labels in whole] == [5, 5, 2]
  parts = [list(source.batches(5, h, 3)) for h in range(3)]
  assert [sum(len(lab) for _, lab in p) for p in parts] == [4, 4, 4]
  for images_of in (lambda bs: [im for ims, _ in bs for im in ims],
                    lambda bs: [lab for _, labs in bs for lab in labs]):
    np.testing.assert_array_equal(
        np.asarray(sum((images_of(p) for p in parts), [])),
        np.asarray(images_of(whole)))


def test_bad_manual_dir(ilsvrc, tmp_path):
  out = str(tmp_path / "tfds")
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*"
                     "ILSVRC2012_img_train.tar"):
    prepare_imagenet.prepare(missing, out)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="holds none of ILSVRC2012_img_"
                     "train.tar, ILSVRC2012_img_val.tar"):
    prepare_imagenet.prepare(str(empty), out)
  flat = tmp_path / "flat"  # JPEGs straight in the train tar: wrong layout
  flat.mkdir()
  with tarfile.open(flat / prepare_imagenet.TRAIN_TAR, "w") as tar:
    add_file(tar, "n01440764_0.JPEG", image_bytes(0, (40, 40)))
  with pytest.raises(ValueError, match=r"one <wnid>\.tar of JPEGs per "
                     r"ImageNet class.*n01440764_0\.JPEG"):
    prepare_imagenet.prepare(str(flat), out)
  badval = tmp_path / "badval"
  badval.mkdir()
  with tarfile.open(badval / prepare_imagenet.VAL_TAR, "w") as tar:
    add_file(tar, "val/n01440764/x.JPEG", image_bytes(0, (40, 40)))
  with pytest.raises(ValueError, match="ILSVRC2012_val_00000001.JPEG"):
    prepare_imagenet.prepare(str(badval), out)
  assert not os.path.exists(os.path.join(out, "imagenet2012", "5.1.0"))


def test_bad_data_dirs(ilsvrc, tmp_path):
  with pytest.raises(ValueError, match="needs config.data.data_dir"):
    data.load_source("imagenet64", "train", "")
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
    data.load_source("imagenet64", "train", missing)
  with pytest.raises(ValueError, match=r"holds neither imagenet2012/ nor "
                     r"train/.*train/<wnid>/\*\.JPEG"):
    data.load_source("imagenet64", "train", str(tmp_path))
  # ImageNet's val images as distributed: one flat folder, no class dirs.
  flat = tmp_path / "flat" / "val"
  flat.mkdir(parents=True)
  (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(image_bytes(0, (9, 9)))
  with pytest.raises(ValueError, match="1 images but no class subdir.*flat"):
    data.load_source("imagenet64", "validation", str(tmp_path / "flat"))
  (tmp_path / "imagenet2012").mkdir()  # looks like TFDS, but nothing prepared
  with pytest.raises(FileNotFoundError, match="not prepared.*prepare_imagenet"):
    data.load_source("imagenet64", "train", str(tmp_path))
  with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], "
                     "not 'test'"):
    data.load_source("imagenet64", "test", ilsvrc.tfds_dir)


def test_tfrecord_copy_is_rejected_with_how_to_convert(ilsvrc, tmp_path):
  # tfds' default format: the metadata says tfrecord (the shards' contents
  # do not matter, nothing gets read).
  version_dir = tmp_path / "imagenet2012" / "5.1.0"
  shutil.copytree(os.path.join(ilsvrc.tfds_dir, "imagenet2012", "5.1.0"),
                  version_dir)
  info_file = version_dir / "dataset_info.json"
  info = json.loads(info_file.read_text())
  info["fileFormat"] = "tfrecord"
  info_file.write_text(json.dumps(info))
  with pytest.raises(ValueError, match="stored as tfrecord.*convert_format"):
    data.load_source("imagenet64", "train", str(tmp_path))
  with pytest.raises(ValueError, match="already holds imagenet2012 as "
                     "tfrecord"):
    prepare_imagenet.prepare(ilsvrc.manual_dir, str(tmp_path))


def test_extract_latents_reads_tfds_imagenet2012(ilsvrc, tmp_path):
  # Imported here: jax and the VAE are needed by this test only.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jdit import vae  # pylint: disable=g-import-not-at-top
  from jdit.data import extract_latents  # pylint: disable=g-import-not-at-top
  module = vae.AutoencoderKL(block_out_channels=(8, 8, 8, 8),
                             layers_per_block=1, norm_num_groups=4)
  params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                       method="encode")["params"]
  (tmp_path / "vae").mkdir()
  vae.save_vae(str(tmp_path / "vae"), module, params)
  out = str(tmp_path / "latents")
  extract_latents.main([
      "--source", "imagenet2012", "--data_dir", ilsvrc.tfds_dir,
      "--image_size", "32", "--vae", str(tmp_path / "vae"), "--out", out,
      "--flip", "none", "--dtype", "float32", "--batch_size", "8"])
  stored = tfds.builder_from_directory(out).as_data_source("train")
  source = imagenet.TFDSImages("imagenet2012", ilsvrc.tfds_dir, "train", 32)
  assert len(stored) == len(source) == 12
  images = np.stack([source[i]["image"] for i in range(12)])
  mean, _ = jax.jit(lambda x: module.apply({"params": params}, x,
                                          method="encode"))(
                                              imagenet.to_float(images))
  for i in range(12):  # stored in the source's order
    assert stored[i]["label"] == source[i]["label"]
    np.testing.assert_allclose(stored[i]["latent_mean"], mean[i], atol=1e-5)
  with open(os.path.join(out, "latent_stats.json")) as fh:
    stats = json.load(fh)
  assert (stats["num_images"], stats["num_classes"]) == (12, 1000)


@pytest.mark.slow  # ~50 s of compiling; the fast tests cover the same reads
def test_trains_on_imagenet_pixels(ilsvrc, tiny_config, tmp_path):
  # The config route: data.name picks a pixel dataset, data.data_dir the
  # prepared TFDS dir; flips on. A 16px spec keeps the model tiny.
  from jdit import train as train_lib  # pylint: disable=g-import-not-at-top
  spec = imagenet.register("test_imagenet16", 16)
  try:
    c = tiny_config
    c.data.update(name="test_imagenet16", data_dir=ilsvrc.tfds_dir, flip=True)
    c.model.update(input_size=16, in_channels=3, num_classes=1000)
    c.batch_size, c.total_steps = 8, 2
    train_lib.run(c, str(tmp_path))
  finally:
    data.DATASETS.pop("test_imagenet16")
  assert spec.shape == (16, 16, 3)
  with open(tmp_path / "metrics.jsonl") as fh:
    rows = [json.loads(line) for line in fh]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)
