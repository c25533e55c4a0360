"""DINOv2 ViT image encoder (facebookresearch/dinov2).

The frozen target encoder of REPA (jdit.repa): jdit.convert_dinov2 reads the
torch.hub checkpoints (dinov2_vits14/vitb14/vitl14/vitg14_pretrain.pth and
the `_reg4` variants with register tokens) and `DINOv2` reproduces their
forward pass, including the bicubic resize of the position embedding to
any patch grid, which DINOv2 does with torch's F.interpolate and which is
written here as fixed (numpy) interpolation matrices so that it jits.

    encoder, params = convert_dinov2.load_dinov2("dinov2_vitb14_pretrain.pth")
    x = preprocess(images_uint8_range, 224)   # (B, 224, 224, 3)
    feats = encoder.apply({"params": params}, x)["patch"]  # (B, 256, 768)

Weights: jdit.convert_dinov2.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv2 resizes its position embedding with scale (grid + 0.1) / M rather
# than grid / M (its `interpolate_offset`, against floating-point rounding of
# the output size).
INTERPOLATE_OFFSET = 0.1
HEAD_DIM = 64  # every released DINOv2 uses 64-wide heads
_CUBIC_A = -0.75  # torch's bicubic kernel constant
_HIGHEST = jax.lax.Precision.HIGHEST


def _fma(a, b, c) -> np.ndarray:
  """float32 a * b + c rounded once (the product is exact in float64)."""
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def bicubic_matrix(in_size: int, out_size: int,
                   scale: float | None = None) -> np.ndarray:
  """(out_size, in_size) float32 matrix of torch's bicubic resize on an axis.

  Matches F.interpolate(mode="bicubic", align_corners=False,
  antialias=False): output i samples source coordinate (i + 0.5) / s - 0.5
  with s = `scale` when given (torch's scale_factor=, not recomputed) and
  s = out_size / in_size otherwise (torch's size=); the four taps of the
  A = -0.75 cubic kernel are clamped to the border.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic_matrix needs positive sizes, got in_size="
                     f"{in_size}, out_size={out_size}")
  f32 = np.float32
  if scale is not None and scale > 0:
    step = f32(1.0 / scale)  # torch: float(1.0 / double scale)
  else:
    step = f32(in_size) / f32(out_size)
  # torch computes the coordinate and the kernel in float32 with fused
  # multiply-adds. Its rounding of a coordinate near 36 (M = 37) moves the
  # weights by ~3e-6, so rounding the same way is what keeps the resized
  # embedding within ~1e-7 of torch's rather than 1e-5.
  real = _fma(step, np.arange(out_size) + f32(0.5), f32(-0.5))
  index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  t = np.clip(real - index.astype(f32), 0, 1).astype(f32)
  a = f32(_CUBIC_A)

  def near(x):  # ((a + 2) x - (a + 3)) x x + 1, for |x| <= 1
    return _fma((_fma(a + 2, x, -(a + 3)) * x).astype(f32), x, f32(1))

  def far(x):  # ((a x - 5 a) x + 8 a) x - 4 a, for 1 < |x| < 2
    return _fma(_fma(_fma(a, x, -5 * a), x, 8 * a), x, -4 * a)

  one = lambda x: (np.float64(x) + 1.0).astype(f32)
  t_opp = (1.0 - np.float64(t)).astype(f32)
  weights = np.stack([far(one(t)), near(t), near(t_opp), far(one(t_opp))],
                     axis=1)
  taps = np.clip(index[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
  out = np.zeros((out_size, in_size), f32)
  # Clamped taps can repeat a source index; they add up, as in torch.
  np.add.at(out, (np.repeat(np.arange(out_size), 4), taps.ravel()),
            weights.ravel())
  return out


def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix of an antialiased bicubic resize.

  Matches F.interpolate(mode="bicubic", antialias=True) (and PIL's BICUBIC
  resize before its uint8 rounding): the A = -0.5 cubic kernel, stretched by
  in/out when shrinking so that every source pixel is averaged, truncated
  at the border and renormalised to sum 1. EDM2 measures FD_DINOv2 on
  images resized this way.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"antialiased_bicubic_matrix needs positive sizes, got "
                     f"in_size={in_size}, out_size={out_size}")
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  support = 2.0 * stretch

  def cubic(x):  # A = -0.5
    x = np.abs(x)
    return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
                    np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))

  out = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = np.arange(lo, hi)
    w = cubic((taps - center + 0.5) / stretch)
    out[i, lo:hi] = w / w.sum()
  return out.astype(np.float32)


def resize_2d(x: jax.Array, rows: np.ndarray, cols: np.ndarray,
              axes: tuple[int, int]) -> jax.Array:
  """Applies (out, in) matrices `rows`, `cols` to the two `axes` of x."""
  x = jnp.moveaxis(x, axes, (-2, -1))
  x = jnp.einsum("ia,...ab,jb->...ij", jnp.asarray(rows), x,
                 jnp.asarray(cols), precision=_HIGHEST)
  return jnp.moveaxis(x, (-2, -1), axes)


def interpolate_pos_embed(patch_pos: jax.Array,
                          grid: tuple[int, int]) -> jax.Array:
  """(M, M, D) patch position embedding -> (h, w, D), as DINOv2 does it.

  The stored grid is returned as is; any other grid is a bicubic resize with
  scale (h + 0.1) / M and (w + 0.1) / M, in float32.
  """
  m = patch_pos.shape[0]
  h, w = grid
  if (h, w) == (m, m):
    return patch_pos
  rows = bicubic_matrix(m, h, (h + INTERPOLATE_OFFSET) / m)
  cols = bicubic_matrix(m, w, (w + INTERPOLATE_OFFSET) / m)
  return resize_2d(patch_pos.astype(jnp.float32), rows, cols, (0, 1))


def preprocess(images: jax.Array, size: int | tuple[int, int],
               antialias: bool = False) -> jax.Array:
  """DINOv2's input: uint8-range (B, H, W, 3) -> (B, size, size, 3), or
  (B, h, w, 3) for size (h, w).

  `images` hold values in [0, 255] (uint8 or float); they are divided by
  255, normalised with the ImageNet mean and std, then resized bicubically
  as torch's F.interpolate(size=(size, size), mode="bicubic",
  antialias=antialias) does: without antialiasing for REPA's targets, with
  it for FD_DINOv2 (EDM2). (The resize rows sum to 1, so resizing before or
  after the normalisation is the same.) Returns float32.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3) in [0, 255], got shape "
                     f"{images.shape}")
  out = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if len(out) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1
                              for v in out):
    raise ValueError(f"size must be a positive int or (height, width), got "
                     f"{size!r}")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  x = (images.astype(jnp.float32) / 255.0 - mean) / std
  _, h, w, _ = images.shape
  if (h, w) == out:
    return x
  matrix = antialiased_bicubic_matrix if antialias else bicubic_matrix
  return resize_2d(x, matrix(h, out[0]), matrix(w, out[1]), (1, 2))


def ffn_hidden(hidden_size: int, mlp_ratio: float, ffn: str) -> int:
  """The FFN width DINOv2 builds for `ffn` ("mlp" or "swiglu")."""
  hidden = int(hidden_size * mlp_ratio)
  if ffn == "swiglu":  # SwiGLUFFNFused: 2/3 of it, rounded up to 8
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
  elif ffn != "mlp":
    raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
  return hidden


def _layer_norm(dtype, name):
  # Two-pass variance, as torch: the fast E[x^2] - E[x]^2 loses digits.
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False,
                      name=name)


class LayerScale(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],))
    return x * gamma.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused [q|k|v] projection."""
  num_heads: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, precision=self.precision,
                   name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.num_heads, -1), 3,
                        axis=2)
    y = jax.nn.dot_product_attention(q, k, v)  # scale head_dim ** -0.5
    return nn.Dense(d, dtype=self.dtype, precision=self.precision,
                    name="proj")(y.reshape(b, n, d))


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2, or SwiGLU (vitg14: w12 -> w3)."""
  hidden: int
  ffn: str = "mlp"
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name,
                                     precision=self.precision)
    if self.ffn == "swiglu":
      x1, x2 = jnp.split(dense(2 * self.hidden, "w12")(x), 2, axis=-1)
      return dense(x.shape[-1], "w3")(nn.silu(x1) * x2)
    y = nn.gelu(dense(self.hidden, "fc1")(x), approximate=False)
    return dense(x.shape[-1], "fc2")(y)


class Block(nn.Module):
  """Pre-norm ViT block with LayerScale on both residual branches."""
  num_heads: int
  mlp_hidden: int
  ffn: str = "mlp"
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    attn = Attention(self.num_heads, self.dtype, self.precision, name="attn")
    mlp = Mlp(self.mlp_hidden, self.ffn, self.dtype, self.precision,
              name="mlp")
    x = x + LayerScale(self.dtype, name="ls1")(
        attn(_layer_norm(self.dtype, "norm1")(x)))
    return x + LayerScale(self.dtype, name="ls2")(
        mlp(_layer_norm(self.dtype, "norm2")(x)))


class DINOv2(nn.Module):
  """DINOv2 ViT: patch tokens, class token and optional register tokens.

  Attributes:
    hidden_size, depth, num_heads: width D, block count, heads (D // 64).
    num_register_tokens: R, 0 for the plain models, 4 for the _reg ones.
    pos_grid: side M of the stored position embedding (37: 518px / 14).
    patch_size: 14.
    mlp_ratio: FFN width / D before SwiGLU's 2/3 (see `ffn_hidden`).
    ffn: "mlp" (fc1, GELU, fc2) or "swiglu" (vitg14).
    dtype: compute dtype; params stay float32 and the position embedding
      is resized in float32, as DINOv2 does.
    precision: matmul precision of the blocks (None: jax's default, which
      on GPUs may be TF32; jax.lax.Precision.HIGHEST for float32 exactness).
  """
  hidden_size: int
  depth: int
  num_heads: int
  num_register_tokens: int = 0
  pos_grid: int = 37
  patch_size: int = 14
  mlp_ratio: float = 4.0
  ffn: str = "mlp"
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: (B, H, W, 3) from `preprocess`, H and W multiples of 14.

    Returns {"cls": (B, D), "registers": (B, R, D), "patch": (B, N, D)}
    after the final LayerNorm, N = (H / 14) * (W / 14) in row-major order.
    """
    p, d, m = self.patch_size, self.hidden_size, self.pos_grid
    if (images.ndim != 4 or images.shape[-1] != 3 or not images.shape[1]
        or images.shape[1] % p or not images.shape[2]
        or images.shape[2] % p):
      raise ValueError(f"images must be (B, H, W, 3) with H and W multiples "
                       f"of the patch size {p}, got shape {images.shape}")
    b, h, w, _ = images.shape
    if d % self.num_heads:
      raise ValueError(f"hidden_size {d} is not divisible by num_heads "
                       f"{self.num_heads}")
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                precision=self.precision, name="patch_embed")(images)
    grid = (h // p, w // p)
    x = x.reshape(b, grid[0] * grid[1], d)
    init = nn.initializers.normal(0.02)
    cls = self.param("cls_token", init, (1, 1, d))
    pos = self.param("pos_embed", init, (1, 1 + m * m, d))
    patch_pos = interpolate_pos_embed(pos[0, 1:].reshape(m, m, d), grid)
    pos = jnp.concatenate([pos[0, :1], patch_pos.reshape(-1, d)])
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + pos.astype(x.dtype)
    r = self.num_register_tokens
    if r:
      # Registers go after the class token and get no position embedding.
      reg = self.param("register_tokens", init, (1, r, d))
      x = jnp.concatenate(
          [x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (b, r, d)),
           x[:, 1:]], axis=1)
    hidden = ffn_hidden(d, self.mlp_ratio, self.ffn)
    for i in range(self.depth):
      x = Block(self.num_heads, hidden, self.ffn, self.dtype, self.precision,
                name=f"blocks_{i}")(x)
    x = _layer_norm(self.dtype, "norm")(x)
    return {"cls": x[:, 0], "registers": x[:, 1:r + 1], "patch": x[:, r + 1:]}
