"""ImageNet images for latent extraction: ADM centre crops, flips, readers.

Two sources of (image, label) pairs, both read in a fixed order and split into
contiguous per-host shards (host h of P reads the h-th of P near-equal
slices), so concatenating the hosts' outputs in host order gives the whole
dataset in its canonical order:

* `ImageFolder(root)`: `root/<class_dir>/*.{JPEG,jpg,png}`, classes sorted by
  directory name -> label ids 0..K-1 (torchvision's ImageFolder convention,
  which DiT and fast-DiT train on). Needs only PIL.
* `TFDSImages("imagenet2012", data_dir)`: the TFDS dataset. Its records are
  TFRecords of JPEG bytes, which only TensorFlow reads; install the extra
  with `pip install tensorflow-cpu`. JPEGs are decoded with PIL, as in the
  folder path, so both paths give the same pixels.

Images are preprocessed as ADM / DiT do (`center_crop_arr`): halve with a BOX
filter while the short side is >= 2 * size, BICUBIC-resize so the short side
is `size`, then take the centre square.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
TF_EXTRA = "pip install tensorflow-cpu"


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """ADM's centre crop (guided-diffusion image_datasets.py), as uint8.

  Args:
    image: a PIL image (converted to RGB).
    size: side of the square output.

  Returns:
    (size, size, 3) uint8 array.
  """
  if size < 1:
    raise ValueError(f"image size must be >= 1, got {size}")
  image = image.convert("RGB")
  # Repeated 2x BOX downsampling first: a single large BICUBIC resize would
  # alias; halving with a box filter is exact area averaging.
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size),
                         resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size),
                       resample=Image.BICUBIC)
  arr = np.asarray(image)
  top = (arr.shape[0] - size) // 2
  left = (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def hflip(images: np.ndarray) -> np.ndarray:
  """Horizontal flip of (..., H, W, C) images."""
  return images[..., :, ::-1, :]


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the VAE's input range."""
  return images.astype(np.float32) / 127.5 - 1.0


def host_slice(n: int, process_index: int, process_count: int) -> slice:
  """The contiguous part of n items that host `process_index` handles."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count})")
  return slice(n * process_index // process_count,
               n * (process_index + 1) // process_count)


def _open(path_or_bytes, size: int) -> np.ndarray:
  src = (io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes)
         else path_or_bytes)
  try:
    with Image.open(src) as image:
      return center_crop_arr(image, size)
  except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is OSError
    name = "an image record" if isinstance(path_or_bytes, bytes) else (
        path_or_bytes)
    raise ValueError(f"cannot decode {name}: {e}") from e


class ImageFolder:
  """Images in `root/<class_dir>/<file>`, labels from sorted class dirs.

  Attributes:
    classes: class directory names, sorted; label i is classes[i].
    paths, labels: this host's files (sorted by class, then file name).
    total: number of images over all hosts.
  """

  def __init__(self, root: str, process_index: int = 0,
               process_count: int = 1):
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist")
    self.root = root
    self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not self.classes:
      raise ValueError(f"image folder {root!r} has no class subdirectories "
                       f"(expected root/<class>/*.JPEG)")
    paths, labels = [], []
    for label, name in enumerate(self.classes):
      files = sorted(
          f.name for f in os.scandir(os.path.join(root, name))
          if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(root, name, f) for f in files]
      labels += [label] * len(files)
    if not paths:
      raise ValueError(f"image folder {root!r} has no images with extensions "
                       f"{IMAGE_EXTENSIONS} in its class subdirectories")
    self.total = len(paths)
    part = host_slice(len(paths), process_index, process_count)
    self.paths, self.labels = paths[part], labels[part]

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.paths)

  def batches(self, batch_size: int, size: int, workers: int = 16
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (uint8 (b, size, size, 3), int64 labels (b,)) in order."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for i in range(0, len(self.paths), batch_size):
        chunk = self.paths[i:i + batch_size]
        images = list(pool.map(lambda p: _open(p, size), chunk))
        yield (np.stack(images),
               np.asarray(self.labels[i:i + batch_size], np.int64))


class TFDSImages:
  """A TFDS image dataset (e.g. imagenet2012) read in order via TensorFlow.

  The dataset must be prepared in `data_dir` (for imagenet2012: put
  ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
  <data_dir>/downloads/manual, then `tfds build imagenet2012 --data_dir ...`).
  """

  def __init__(self, name: str, data_dir: str, split: str = "train",
               process_index: int = 0, process_count: int = 1):
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"reading {name!r} from TFDS needs TensorFlow (its records are "
          f"TFRecords of JPEGs): `{TF_EXTRA}`, or use --source folder with "
          f"the extracted images") from e
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators
    self.builder = tfds.builder(name, data_dir=data_dir or None)
    self.builder.download_and_prepare()  # no-op once prepared
    self.split = tfds.even_splits(split, n=process_count,
                                  drop_remainder=False)[process_index]
    self.total = self.builder.info.splits[split].num_examples
    self._len = self.builder.info.splits[self.split].num_examples
    self.classes = list(self.builder.info.features["label"].names)
    self._tfds = tfds

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return self._len

  def batches(self, batch_size: int, size: int, workers: int = 16
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (uint8 (b, size, size, 3), int64 labels (b,)) in order."""
    tfds = self._tfds
    ds = self.builder.as_dataset(
        split=self.split, shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
        decoders={"image": tfds.decode.SkipDecoding()})  # JPEGs via PIL
    ds = ds.batch(batch_size).prefetch(2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for ex in tfds.as_numpy(ds):
        images = list(pool.map(lambda b: _open(bytes(b), size), ex["image"]))
        yield np.stack(images), ex["label"].astype(np.int64)


def open_source(source: str, *, data_dir: str = "", folder: str = "",
                split: str = "train", process_index: int = 0,
                process_count: int = 1):
  """`folder` (an ImageFolder at `folder`) or a TFDS dataset name."""
  if source == "folder":
    if not folder:
      raise ValueError("--source folder needs --folder PATH")
    return ImageFolder(folder, process_index, process_count)
  return TFDSImages(source, data_dir, split, process_index, process_count)
