"""ImageNet images: ADM centre crops from a class folder or from TFDS.

Two random-access sources of examples {"image": (s, s, 3) uint8 ADM centre
crop, "label": int64}, each in one fixed order. They serve both
jdit.data.InputPipeline (pixel-space training: batch `step` is a function of
seed and step, each host reads its own part of it) and
jdit.data.extract_latents (host h of P encodes the h-th contiguous slice, in
order). Neither needs TensorFlow.

* `ImageFolder(root)`: root/<class_dir>/*.{JPEG,jpg,png}, classes sorted by
  directory name -> labels 0..K-1 (torchvision's ImageFolder, which DiT and
  fast-DiT train on). For ImageNet's 1000 wnid folders these are the label
  ids of TFDS's imagenet2012 too, whose label names are the sorted wnids.
* `TFDSImages("imagenet2012", data_dir)`: a TFDS dataset prepared in
  ArrayRecord format (jdit.data.prepare_imagenet builds imagenet2012 from the
  ILSVRC2012 tars without TensorFlow), read with tfds' data source. Its JPEG
  bytes are decoded by PIL as the folder's files are, so one image gives the
  same pixels from either source.

Pixel-space datasets for training, config.data.name (config.data.data_dir is
a TFDS data dir holding imagenet2012/, or a folder root holding
<split>/<wnid>/*.JPEG): imagenet64, imagenet128, imagenet256, imagenet512.

Images are preprocessed as ADM / DiT do (`center_crop_arr`): halve with a BOX
filter while the short side is >= 2 * size, BICUBIC-resize so the short side
is `size`, then take the centre square.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jdit.data.pipeline import DATASETS, DatasetSpec, uint8_images

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
TFDS_NAME = "imagenet2012"
FOLDER_LAYOUT = "<root>/<class>/*.JPEG (e.g. ImageNet's train/n01440764/*.JPEG)"
# Folder names tried for a split: TFDS calls ImageNet's "val" "validation".
FOLDER_SPLITS = {"validation": ("validation", "val")}
# Where an image folder's labels come from: its class subdirectories, or
# nowhere (one class: unconditional models).
LABEL_SOURCES = ("dirs", "none")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """ADM's centre crop (guided-diffusion image_datasets.py), as uint8.

  Args:
    image: a PIL image (converted to RGB first, as ADM's and DiT's loaders do).
    size: side of the square output.

  Returns:
    (size, size, 3) uint8 array.
  """
  return cover_crop(image, size, size)


def cover_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
  """ADM's centre crop generalised to a (height, width) box: the image is
  scaled (aspect kept) to the smallest size that covers the box, then the
  box is cut from its centre. For a square box it is exactly ADM's
  `center_crop_arr`; aspect-ratio buckets (jdit.data.buckets) use the rest.

  Returns:
    (height, width, 3) uint8 array.
  """
  if height < 1 or width < 1:
    raise ValueError(f"image size must be >= 1, got {height}x{width}")
  image = image.convert("RGB")
  # Repeated 2x BOX downsampling first: a single large BICUBIC resize would
  # alias; halving with a box filter is exact area averaging.
  while image.size[0] >= 2 * width and image.size[1] >= 2 * height:
    image = image.resize(tuple(s // 2 for s in image.size),
                         resample=Image.BOX)
  scale = max(width / image.size[0], height / image.size[1])
  image = image.resize((max(width, round(image.size[0] * scale)),
                        max(height, round(image.size[1] * scale))),
                       resample=Image.BICUBIC)
  arr = np.asarray(image)
  top = (arr.shape[0] - height) // 2
  left = (arr.shape[1] - width) // 2
  return arr[top:top + height, left:left + width]


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


def _open(encoded: bytes | str, what):
  """Opens an image file path or encoded bytes and applies `what` to it."""
  src = io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded
  try:
    with Image.open(src) as image:
      return what(image)
  except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is OSError
    name = "an image record" if isinstance(encoded, bytes) else repr(encoded)
    raise ValueError(f"cannot decode {name}: {e}") from e


def decode_crop(encoded: bytes | str, size: int | tuple[int, int]
                ) -> np.ndarray:
  """An image file path or encoded bytes -> its ADM crop: (size, size, 3),
  or (height, width, 3) for size = (height, width)."""
  h, w = (size, size) if isinstance(size, int) else size
  return _open(encoded, lambda image: cover_crop(image, h, w))


def header_size(encoded: bytes | str) -> tuple[int, int]:
  """(width, height) of an image, from its header alone (no decoding)."""
  return _open(encoded, lambda image: image.size)


class _CroppedImages:
  """Random access to cropped examples; subclasses say where bytes live."""

  classes: list[str]

  def __init__(self, image_size: int, workers: int):
    if image_size < 1:
      raise ValueError(f"image_size must be >= 1, got {image_size}")
    self.image_size = image_size
    self.crop_shape = (image_size, image_size)  # (height, width)
    # Threads suffice: PIL releases the GIL while decoding and resizing.
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    raise NotImplementedError

  def _encoded(self, indices: list[int]) -> tuple[list, list[int]]:
    """(paths or encoded bytes, labels) of the examples at `indices`."""
    raise NotImplementedError

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    encoded, labels = self._encoded([int(i) for i in indices])
    images = self._pool.map(
        functools.partial(decode_crop, size=self.crop_shape), encoded)
    return [{"image": image, "label": np.int64(label)}
            for image, label in zip(images, labels)]

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} images")
    return self.__getitems__([index % len(self)])[0]

  def sizes(self, indices: Sequence[int]) -> np.ndarray:
    """(len(indices), 2) int array of the stored images' (width, height),
    read from their headers."""
    encoded, _ = self._encoded([int(i) for i in indices])
    return np.asarray(list(self._pool.map(header_size, encoded)),
                      np.int64).reshape(-1, 2)

  def subset(self, indices: Sequence[int], crop_shape: tuple[int, int]
             ) -> "_CroppedImages":
    """The images at `indices` (in that order), cropped to (height, width)
    `crop_shape`: one aspect-ratio bucket (jdit.data.buckets)."""
    return _Subset(self, indices, crop_shape)

  def batches(self, batch_size: int, process_index: int = 0,
              process_count: int = 1, skip: int = 0
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This host's contiguous slice, in order, as (uint8 (b, h, w, 3) crops,
    int64 labels (b,)); the hosts' slices concatenate to the whole
    dataset. `skip`: start after the slice's first `skip` images."""
    part = host_slice(len(self), process_index, process_count)
    for start in range(part.start + skip, part.stop, batch_size):
      examples = self.__getitems__(
          range(start, min(start + batch_size, part.stop)))
      yield (np.stack([ex["image"] for ex in examples]),
             np.asarray([ex["label"] for ex in examples], np.int64))


class _Subset(_CroppedImages):
  """Some of a source's images, in a given order, cropped to another shape."""

  def __init__(self, parent: _CroppedImages, indices: Sequence[int],
               crop_shape: tuple[int, int]):
    if len(crop_shape) != 2 or min(crop_shape) < 1:
      raise ValueError(f"crop_shape must be (height, width) >= 1, got "
                       f"{crop_shape}")
    self._parent = parent
    self._indices = np.asarray(indices, np.int64)
    self.classes = parent.classes
    self.image_size = max(crop_shape)
    self.crop_shape = tuple(int(v) for v in crop_shape)
    self._pool = parent._pool  # pylint: disable=protected-access

  def __len__(self) -> int:
    return len(self._indices)

  def _encoded(self, indices):
    # pylint: disable-next=protected-access
    return self._parent._encoded([int(self._indices[i]) for i in indices])


class ImageFolder(_CroppedImages):
  """Images in `root/<class_dir>/<file>`, labels from sorted class dirs;
  with labels="none", every image under `root` (any depth: FFHQ's
  00000/..69000/ shards, a flat CelebA-HQ folder), all of class 0, for
  unconditional models.

  Attributes:
    classes: class directory names, sorted; label i is classes[i] (labels
      "none": the one class "unlabeled").
    paths, labels: all images, sorted by class, then file name (labels
      "none": by path).
  """

  def __init__(self, root: str, image_size: int, workers: int = 16,
               labels: str = "dirs"):
    super().__init__(image_size, workers)
    root = os.path.expanduser(root)
    if labels not in LABEL_SOURCES:
      raise ValueError(f"labels must be one of {LABEL_SOURCES}, got "
                       f"{labels!r}")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist; "
                              f"expected {FOLDER_LAYOUT}")
    self.root = root
    if labels == "none":
      self.classes = ["unlabeled"]
      self.paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root)
                          for f in files if _is_image(f))
      self.labels = [0] * len(self.paths)
      if not self.paths:
        raise ValueError(f"image folder {root!r} holds no images with "
                         f"extensions {IMAGE_EXTENSIONS} at any depth")
      return
    entries = list(os.scandir(root))
    self.classes = sorted(e.name for e in entries if e.is_dir())
    if not self.classes:
      loose = sum(e.is_file() and _is_image(e.name) for e in entries)
      found = (f"{loose} images but no class subdirectories (ImageNet's "
               f"flat val/ images must first be moved into <wnid>/ dirs; "
               f"unlabeled images take labels='none')"
               if loose else "no class subdirectories")
      raise ValueError(f"image folder {root!r} has {found}; expected "
                       f"{FOLDER_LAYOUT}")
    self.paths, self.labels = [], []
    for label, name in enumerate(self.classes):
      files = sorted(f.name for f in os.scandir(os.path.join(root, name))
                     if f.is_file() and _is_image(f.name))
      self.paths += [os.path.join(root, name, f) for f in files]
      self.labels += [label] * len(files)
    if not self.paths:
      raise ValueError(f"image folder {root!r} has class subdirectories but "
                       f"no images with extensions {IMAGE_EXTENSIONS} in "
                       f"them; expected {FOLDER_LAYOUT}")

  def __len__(self) -> int:
    return len(self.paths)

  def _encoded(self, indices):
    return [self.paths[i] for i in indices], [self.labels[i] for i in indices]


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


class TFDSImages(_CroppedImages):
  """A prepared TFDS image dataset (features "image", "label"), by index.

  Needs the ArrayRecord format (random access, no TensorFlow): what
  jdit.data.prepare_imagenet and `tfds build --file_format array_record`
  write. A TFRecord copy is rejected with how to convert it.
  """

  def __init__(self, name: str, data_dir: str, split: str = "train",
               image_size: int = 256, workers: int = 16):
    super().__init__(image_size, workers)
    data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
    builder = tfds.builder(name, data_dir=data_dir or None)
    where = f"{name!r} in TFDS data dir {str(builder.data_dir_root)!r}"
    if not builder.is_prepared():
      hint = (f"; build it from the ILSVRC2012 tars with `python -m "
              f"jdit.data.prepare_imagenet --manual_dir DIR --data_dir "
              f"{builder.data_dir_root}`" if name == TFDS_NAME else "")
      raise FileNotFoundError(f"dataset {where} is not prepared (no "
                              f"{builder.data_dir}/dataset_info.json){hint}")
    info = builder.info
    if split.split("[")[0] not in info.splits:
      raise ValueError(f"dataset {where} has splits {list(info.splits)}, "
                       f"not {split!r}")
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    if not info.available_file_formats() & random_access:
      stored = info.file_format.value if info.file_format else "tfrecord"
      raise ValueError(
          f"dataset {where} is stored as {stored}, which has "
          f"no random access and needs TensorFlow to read; add an ArrayRecord "
          f"copy once with `tfds convert_format --dataset_version_dir "
          f"{builder.data_dir} --out_file_format array_record` (needs "
          f"tensorflow-cpu), or rebuild it with `python -m "
          f"jdit.data.prepare_imagenet` (no TensorFlow)")
    features = info.features
    if "image" not in features or "label" not in features:
      raise ValueError(f"dataset {where} has features {list(features)}; "
                       f"expected 'image' and 'label'")
    self.name, self.split = name, split
    self.classes = list(features["label"].names)
    # JPEG bytes, decoded by PIL in _CroppedImages like the folder's files.
    self._data = builder.as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._data)

  def _encoded(self, indices):
    records = self._data.__getitems__(indices)
    return [r["image"] for r in records], [int(r["label"]) for r in records]


def open_source(source: str, *, data_dir: str = "", folder: str = "",
                split: str = "train", image_size: int = 256,
                workers: int = 16, labels: str = "dirs") -> _CroppedImages:
  """`folder` (an ImageFolder at `folder`, labelled as `labels` says) or a
  TFDS dataset name."""
  if source == "folder":
    if not folder:
      raise ValueError("--source folder needs --folder PATH")
    return ImageFolder(folder, image_size, workers, labels)
  if labels != "dirs":
    raise ValueError(f"--labels {labels} applies to --source folder; TFDS "
                     f"datasets bring their labels")
  return TFDSImages(source, data_dir, split, image_size, workers)


def load(split: str, data_dir: str, *, name: str, image_size: int,
         workers: int = 16) -> _CroppedImages:
  """config.data.data_dir -> the source of a pixel-space ImageNet dataset:
  TFDS's imagenet2012 if data_dir holds it, else the image folder
  data_dir/<split>."""
  layouts = (f"a TFDS data dir holding {TFDS_NAME}/ (jdit.data."
             f"prepare_imagenet) or an image folder root holding "
             f"{split}/<wnid>/*.JPEG")
  if not data_dir:
    raise ValueError(f"dataset {name!r} needs config.data.data_dir: "
                     f"{layouts}")
  root = os.path.expanduser(data_dir)
  if "://" in root:  # gs:// etc.: PIL reads only local files, so TFDS
    return TFDSImages(TFDS_NAME, root, split, image_size, workers)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config.data.data_dir {root!r} of dataset "
                            f"{name!r} does not exist; expected {layouts}")
  if os.path.isdir(os.path.join(root, TFDS_NAME)):
    return TFDSImages(TFDS_NAME, root, split, image_size, workers)
  for sub in FOLDER_SPLITS.get(split, (split,)):
    if os.path.isdir(os.path.join(root, sub)):
      return ImageFolder(os.path.join(root, sub), image_size, workers)
  raise ValueError(f"config.data.data_dir {root!r} of dataset {name!r} "
                   f"holds neither {TFDS_NAME}/ nor {split}/; expected "
                   f"{layouts}")


def register(name: str, image_size: int,
             num_classes: int = 1000) -> DatasetSpec:
  """Registers a pixel-space dataset in jdit.data.DATASETS: ADM crops of
  side `image_size`, as float32 in [-1, 1] (config.data.flip flips them)."""
  spec = DatasetSpec(
      TFDS_NAME, (image_size, image_size, 3), num_classes, uint8_images,
      load=functools.partial(load, name=name, image_size=image_size))
  DATASETS[name] = spec
  return spec


for _size in (64, 128, 256, 512):  # ADM's ImageNet resolutions
  register(f"imagenet{_size}", _size)
