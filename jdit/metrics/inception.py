"""The FID Inception-v3 network in Flax, with pytorch-fid's weights.

This is the network of TensorFlow's 2015 Inception graph
(`classify_image_graph_def.pb`, used by the TTUR FID code and by the ADM
evaluator), in the form pytorch-fid ported it: torchvision's Inception3 with
FIDInceptionA/C/E_1/E_2 blocks (average pools that ignore padding; a max
pool in the last block's pool branch) and 1008 output classes. Weights come
from pytorch-fid's release file `pt_inception-2015-12-05-6726825d.pth`
(converted by `inception_params_from_torch`; read from a local path).

Outputs, per image:
  pool     (2048,)  the average-pooled features ("pool_3") for FID;
  spatial  (2023,)  the first 7 channels of mixed_6/conv (Mixed_6d's 1x1
                    branch, 17x17 at 299px), flattened (H, W, C) as ADM does,
                    for sFID;
  logits   (1008,)  pool @ W with the softmax layer's weights and no bias,
                    as ADM and the original Inception Score code compute them.

Preprocessing (`preprocess`), from uint8 (B, H, W, 3) images:
  "adm" (default): what the ADM evaluator's TF graph does: legacy TF
    ResizeBilinear to 299x299 (align_corners=False, half_pixel_centers=False)
    on [0, 255] values, then (x - 128) / 128. Use this to compare with ADM
    reference batches (VIRTUAL_imagenet256_labeled.npz): their mu/sigma were
    computed this way.
  "pytorch_fid": pytorch-fid's F.interpolate(bilinear, align_corners=False)
    (half-pixel centres, no antialiasing) on x / 255, then 2x - 1.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
RESIZE_MODES = ("adm", "pytorch_fid")


class BasicConv(nn.Module):
  """Conv (no bias) -> inference BatchNorm (eps 1e-3) -> ReLU."""
  features: int
  kernel: Sequence[int] = (1, 1)
  strides: int = 1
  padding: Any = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel),
                strides=(self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name="conv")(x)
    # Frozen network: the BatchNorm statistics are plain parameters.
    c = self.features
    bn = {n: self.param(n, nn.initializers.zeros_init(), (c,))
          for n in ("scale", "bias", "mean", "var")}
    x = (x - bn["mean"]) * (bn["scale"] * jax.lax.rsqrt(bn["var"] + 1e-3))
    return nn.relu(x + bn["bias"])


def _bc(name, c, k=1, s=1, p=0):
  k = (k, k) if isinstance(k, int) else k
  p = (p, p) if isinstance(p, int) else p
  return BasicConv(c, k, s, p, name=name)


def _avg_pool(x):
  # TF's average pool ignores the padding (pytorch-fid's FID patch).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                     count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _bc("branch1x1", 64)(x)
    b5 = _bc("branch5x5_2", 64, 5, p=2)(_bc("branch5x5_1", 48)(x))
    b3 = _bc("branch3x3dbl_1", 64)(x)
    b3 = _bc("branch3x3dbl_3", 96, 3, p=1)(
        _bc("branch3x3dbl_2", 96, 3, p=1)(b3))
    bp = _bc("branch_pool", self.pool_features)(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _bc("branch3x3", 384, 3, s=2)(x)
    bd = _bc("branch3x3dbl_1", 64)(x)
    bd = _bc("branch3x3dbl_3", 96, 3, s=2)(
        _bc("branch3x3dbl_2", 96, 3, p=1)(bd))
    bp = nn.max_pool(x, (3, 3), (2, 2), "VALID")
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """Returns (output, branch1x1) so that mixed_6/conv can be read off."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = _bc("branch1x1", 192)(x)
    b7 = _bc("branch7x7_1", c)(x)
    b7 = _bc("branch7x7_2", c, (1, 7), p=(0, 3))(b7)
    b7 = _bc("branch7x7_3", 192, (7, 1), p=(3, 0))(b7)
    bd = _bc("branch7x7dbl_1", c)(x)
    bd = _bc("branch7x7dbl_2", c, (7, 1), p=(3, 0))(bd)
    bd = _bc("branch7x7dbl_3", c, (1, 7), p=(0, 3))(bd)
    bd = _bc("branch7x7dbl_4", c, (7, 1), p=(3, 0))(bd)
    bd = _bc("branch7x7dbl_5", 192, (1, 7), p=(0, 3))(bd)
    bp = _bc("branch_pool", 192)(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _bc("branch3x3_2", 320, 3, s=2)(_bc("branch3x3_1", 192)(x))
    b7 = _bc("branch7x7x3_1", 192)(x)
    b7 = _bc("branch7x7x3_2", 192, (1, 7), p=(0, 3))(b7)
    b7 = _bc("branch7x7x3_3", 192, (7, 1), p=(3, 0))(b7)
    b7 = _bc("branch7x7x3_4", 192, 3, s=2)(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2), "VALID")
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """E_1 (average pool) or E_2 (max pool, as in the TF graph's mixed_10)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = _bc("branch1x1", 320)(x)
    b3 = _bc("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([_bc("branch3x3_2a", 384, (1, 3), p=(0, 1))(b3),
                          _bc("branch3x3_2b", 384, (3, 1), p=(1, 0))(b3)],
                         axis=-1)
    bd = _bc("branch3x3dbl_2", 384, 3, p=1)(_bc("branch3x3dbl_1", 448)(x))
    bd = jnp.concatenate([_bc("branch3x3dbl_3a", 384, (1, 3), p=(0, 1))(bd),
                          _bc("branch3x3dbl_3b", 384, (3, 1), p=(1, 0))(bd)],
                         axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool(x)
    bp = _bc("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 on preprocessed (B, H, W, 3) inputs in [-1, 1].

  Any H, W >= 75 runs; FID protocols use 299 (see `preprocess`). Returns a
  dict with "pool" (B, 2048), "spatial" (B, h*w*7) and "logits" (B, 1008).
  """

  @nn.compact
  def __call__(self, x):
    x = _bc("Conv2d_1a_3x3", 32, 3, s=2)(x)
    x = _bc("Conv2d_2a_3x3", 32, 3)(x)
    x = _bc("Conv2d_2b_3x3", 64, 3, p=1)(x)
    x = nn.max_pool(x, (3, 3), (2, 2), "VALID")
    x = _bc("Conv2d_3b_1x1", 80)(x)
    x = _bc("Conv2d_4a_3x3", 192, 3)(x)
    x = nn.max_pool(x, (3, 3), (2, 2), "VALID")
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    w = self.param("fc", nn.initializers.zeros_init(), (2048, NUM_CLASSES))
    logits = jnp.dot(pool, w, precision=jax.lax.Precision.HIGHEST)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]
    return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": logits}


def resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
  """(n_out, n_in) bilinear interpolation weights along one axis."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got "
                     f"{mode!r}")
  scale = n_in / n_out
  dst = np.arange(n_out, dtype=np.float64)
  if mode == "adm":  # TF1 legacy: no half-pixel offset
    src = dst * scale
  else:  # torch align_corners=False: half-pixel centres, clamped at 0
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array, mode: str = "adm",
               size: int = INPUT_SIZE) -> jax.Array:
  """uint8 (or [0, 255] float) (B, H, W, 3) -> network input (B, S, S, 3)."""
  x = images.astype(jnp.float32)
  _, h, w, _ = x.shape
  if (h, w) != (size, size):
    # Bilinear resizing is separable: two small matmuls per image.
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", resize_matrix(h, size, mode), x,
                   precision=hi)
    x = jnp.einsum("pw,bowc->bopc", resize_matrix(w, size, mode), x,
                   precision=hi)
  if mode == "adm":
    return (x - 128.0) / 128.0
  return x / 127.5 - 1.0


# Ignored keys of pytorch-fid / torchvision files: BatchNorm counters, the
# unused softmax bias (ADM's logits have none), torchvision's aux head.
def _ignored(key: str) -> bool:
  return (key.endswith("num_batches_tracked") or key == "fc.bias"
          or key.startswith("AuxLogits."))


_BN = {"scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean",
       "var": "bn.running_var"}


def inception_params_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """pytorch-fid's FID Inception state dict -> InceptionV3 params.

  Raises jdit.convert.CheckpointMismatchError listing every key that does
  not fit (e.g. torchvision's ImageNet Inception, with 1000 classes).
  """
  from jdit import convert  # pylint: disable=g-import-not-at-top
  sd = convert.unwrap_state_dict(state_dict, ("state_dict",))
  shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 75, 75, 3)))["params"]
  layout = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    names = [k.key for k in path]
    if names == ["fc"]:
      layout["fc.weight"] = ((NUM_CLASSES, 2048), names, "linear")
    elif names[-1] == "kernel":  # .../conv/kernel
      kh, kw, cin, cout = leaf.shape
      layout[".".join(names[:-1]) + ".weight"] = ((cout, cin, kh, kw), names,
                                                  "conv")
    else:
      layout[".".join(names[:-1] + [_BN[names[-1]]])] = (leaf.shape, names,
                                                          "id")
  convert.check_keys(sd, {k: v[0] for k, v in layout.items()},
                     "the FID Inception-v3 (pytorch-fid pt_inception-2015-"
                     "12-05)", ignore=_ignored)
  params: dict = {}
  for key, (_, names, kind) in layout.items():
    convert.set_path(params, names, convert.torch_to_flax(sd[key], kind))
  return params


def load_inception(path: str) -> dict:
  """Reads pt_inception-2015-12-05-6726825d.pth (local) -> params."""
  from jdit import convert  # pylint: disable=g-import-not-at-top
  return inception_params_from_torch(convert.load_state_dict(path))
