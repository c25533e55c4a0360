"""Build TFDS's imagenet2012 from the ILSVRC2012 tars, without TensorFlow.

  python -m jdit.data.prepare_imagenet --manual_dir /data/ilsvrc2012 \\
      --data_dir ~/tensorflow_datasets

--manual_dir holds the files image-net.org distributes, as TFDS expects them:
ILSVRC2012_img_train.tar (one <wnid>.tar of JPEGs per class) and/or
ILSVRC2012_img_val.tar (ILSVRC2012_val_00000001.JPEG, ...), optionally
ILSVRC2012_img_test.tar. The result, <data_dir>/imagenet2012/5.1.0, is what
`tfds build imagenet2012 --file_format array_record` writes, because it is
tfds' own builder (features, label ids = sorted wnids, validation labels,
example keys, shuffling, shards, metadata) with only the parts that call
TensorFlow replaced: file access (tf.io.gfile) by plain Python, and the
re-encoding of ImageNet's 22 CMYK JPEGs and one PNG by PIL. It is stored as
ArrayRecord, which tfds.data_source and jdit.data.imagenet read by index
without TensorFlow. Preparing all of ImageNet takes hours (it is I/O bound, as
with `tfds build`) and about 150 GB beside the tars.
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import tarfile

import tensorflow_datasets as tfds
from PIL import Image

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TEST_TAR = "ILSVRC2012_img_test.tar"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")

_TfdsImagenet2012 = tfds.builder_cls("imagenet2012")
_BUILDER_MODULE = importlib.import_module(_TfdsImagenet2012.__module__)


class Imagenet2012(_TfdsImagenet2012, skip_registration=True):
  """tfds' imagenet2012 builder with TensorFlow-free file access."""

  name = "imagenet2012"  # same name and version: the output is tfds' dataset
  # tfds reads a builder's checksums and metadata (description, citation)
  # from the directory of its code: those of tfds' imagenet2012, not jdit's.
  code_path = _TfdsImagenet2012.code_path
  pkg_dir_path = code_path.parent

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    train, val, test = (os.path.join(manual, f)
                        for f in (TRAIN_TAR, VAL_TAR, TEST_TAR))
    splits = []
    if os.path.isfile(train):
      _check_train_tar(train, set(self.info.features["label"].names))
      splits.append(tfds.core.SplitGenerator(
          name=tfds.Split.TRAIN, gen_kwargs={"archive": _iter_tar(train)}))
    if os.path.isfile(val):
      splits.append(tfds.core.SplitGenerator(
          name=tfds.Split.VALIDATION,
          gen_kwargs={"archive": _iter_tar(val),
                      "validation_labels": _validation_labels(val)}))
    if os.path.isfile(test):
      splits.append(tfds.core.SplitGenerator(
          name=tfds.Split.TEST,
          gen_kwargs={"archive": _iter_tar(test), "labels_exist": False}))
    if not splits:
      raise FileNotFoundError(_missing_tars(manual))
    return splits

  def _fix_image(self, image_fname, image):
    # tfds re-encodes these few files with TensorFlow (RGB JPEG, quality 100)
    # so that every record is an RGB JPEG; PIL does the same here.
    if (image_fname in _BUILDER_MODULE.CMYK_IMAGES
        or image_fname in _BUILDER_MODULE.PNG_IMAGES):
      with Image.open(image) as img:
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=100)
      return io.BytesIO(out.getvalue())
    return image


def _iter_tar(path: str):
  """(name, file object) of each member, streamed (tfds' TAR_STREAM)."""
  with open(path, "rb") as f:
    yield from tfds.download.iter_archive(
        f, tfds.download.ExtractMethod.TAR_STREAM)


def _member_names(path: str) -> list[str]:
  # Reads only the tar headers (seeking past the data): seconds even for the
  # 140 GB train tar with its 1000 members.
  try:
    with tarfile.open(path) as tar:
      return [os.path.normpath(m.name) for m in tar if m.isfile()]
  except tarfile.TarError as e:
    raise ValueError(f"{path!r} is not a readable tar file: {e}") from e


def _check_train_tar(path: str, wnids: set[str]) -> None:
  """The train tar must hold one <wnid>.tar per class, as ImageNet's does."""
  names = _member_names(path)
  bad = [n for n in names if not (n.endswith(".tar") and n[:-4] in wnids)]
  if bad or not names:
    raise ValueError(
        f"{path!r} should hold one <wnid>.tar of JPEGs per ImageNet class "
        f"(e.g. n01440764.tar), as image-net.org's {TRAIN_TAR} does, but "
        f"holds {bad[:3] or 'nothing'}"
        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}")


def _validation_labels(path: str) -> dict[str, str]:
  """Val image name -> wnid. tfds' validation_labels.txt lists the wnids of
  ILSVRC2012_val_00000001.JPEG, ... in order; the number in the name picks
  the line (tfds zips sorted names with the lines: the same for the full set,
  and still right for a partial tar)."""
  labels_file = tfds.core.tfds_path(
      "datasets/imagenet2012/validation_labels.txt")
  wnids = labels_file.read_text().split()
  labels = {}
  for name in _member_names(path):
    match = _VAL_NAME.fullmatch(name)
    if not match or not 1 <= int(match[1]) <= len(wnids):
      raise ValueError(
          f"{path!r} holds {name!r}; expected ImageNet's validation images "
          f"ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_"
          f"{len(wnids):08d}.JPEG, as in image-net.org's {VAL_TAR}")
    labels[name] = wnids[int(match[1]) - 1]
  return labels


def _missing_tars(manual_dir: str) -> str:
  return (f"--manual_dir {manual_dir!r} holds none of {TRAIN_TAR}, {VAL_TAR}, "
          f"{TEST_TAR}; download them from https://image-net.org (ILSVRC2012) "
          f"and put them there as they are (no unpacking)")


def prepare(manual_dir: str, data_dir: str) -> Imagenet2012:
  """Builds <data_dir>/imagenet2012 (ArrayRecord) from the tars in
  `manual_dir`; a no-op if it is already there. Returns the builder."""
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"--manual_dir {manual_dir!r} does not exist; it "
                            f"should hold {TRAIN_TAR} and/or {VAL_TAR}")
  if not any(os.path.isfile(os.path.join(manual_dir, f))
             for f in (TRAIN_TAR, VAL_TAR, TEST_TAR)):
    raise FileNotFoundError(_missing_tars(manual_dir))
  data_dir = os.path.expanduser(data_dir)
  existing = tfds.builder("imagenet2012", data_dir=data_dir)
  if existing.is_prepared() and "array_record" not in {
      f.value for f in existing.info.available_file_formats()}:
    raise ValueError(
        f"{existing.data_dir} already holds imagenet2012 as "
        f"{existing.info.file_format.value}; choose another --data_dir, or "
        f"add an ArrayRecord copy with `tfds convert_format "
        f"--dataset_version_dir {existing.data_dir} --out_file_format "
        f"array_record` (needs tensorflow-cpu)")
  builder = Imagenet2012(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m jdit.data.prepare_imagenet",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--manual_dir", required=True,
                 help=f"directory holding {TRAIN_TAR} and/or {VAL_TAR}")
  p.add_argument("--data_dir", required=True,
                 help="TFDS data dir to write imagenet2012/ into")
  args = p.parse_args(argv)
  builder = prepare(args.manual_dir, args.data_dir)
  print(f"{builder.data_dir}: " + ", ".join(
      f"{name} {split.num_examples}"
      for name, split in builder.info.splits.items()))


if __name__ == "__main__":
  main()
