"""jdit.dinov2 against a PyTorch DINOv2 written here from the architecture.

The reference keeps DINOv2's key names (patch_embed.proj, cls_token,
pos_embed, register_tokens, mask_token, blocks.i.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 or mlp.w12/w3, ls2.gamma}, norm)
and its forward pass, position-embedding resize included (F.interpolate with
scale_factor (grid + 0.1) / M). It is tiny: width 128, two 64-wide heads,
depth 2, a 5 x 5 stored grid (70px), random weights and LayerScale.
"""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jdit import convert, convert_dinov2, dinov2

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

# float32 on both sides; differences are summation order in two blocks.
ATOL = 1e-4
# The resize alone: both sides round the weights alike (torch's own float32
# result is ~1e-5 from the float64 one at M = 37); what is left is the order
# of the 4 x 4 float32 products, a few ulp of values up to ~4.
INTERP_TOL = dict(rtol=1e-6, atol=1e-6)
D, HEADS, DEPTH, M, P = 128, 2, 2, 5, 14


class Attention(tnn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv, self.proj = tnn.Linear(dim, 3 * dim), tnn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(x)


class Mlp(tnn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = tnn.Linear(dim, hidden), tnn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(tnn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.w12, self.w3 = tnn.Linear(dim, 2 * hidden), tnn.Linear(hidden, dim)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class LayerScale(tnn.Module):

  def __init__(self, dim):
    super().__init__()
    self.gamma = tnn.Parameter(torch.empty(dim).uniform_(0.2, 1.5))

  def forward(self, x):
    return x * self.gamma


class Block(tnn.Module):

  def __init__(self, dim, heads, swiglu):
    super().__init__()
    self.norm1, self.norm2 = (tnn.LayerNorm(dim, eps=1e-6) for _ in "12")
    self.attn = Attention(dim, heads)
    # SwiGLUFFNFused: 4 * dim * 2 / 3 rounded up to a multiple of 8.
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    self.mlp = (SwiGLU if swiglu else Mlp)(dim, hidden)
    self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class TorchDINOv2(tnn.Module):

  def __init__(self, registers=0, swiglu=False):
    super().__init__()
    self.patch_embed = tnn.Module()
    self.patch_embed.proj = tnn.Conv2d(3, D, P, P)
    self.cls_token = tnn.Parameter(torch.randn(1, 1, D))
    self.pos_embed = tnn.Parameter(torch.randn(1, 1 + M * M, D))
    self.mask_token = tnn.Parameter(torch.zeros(1, D))
    self.registers = registers
    if registers:
      self.register_tokens = tnn.Parameter(torch.randn(1, registers, D))
    self.blocks = tnn.ModuleList(Block(D, HEADS, swiglu)
                                 for _ in range(DEPTH))
    self.norm = tnn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():  # non-trivial norms
      for mod in self.modules():
        if isinstance(mod, tnn.LayerNorm):
          mod.weight.uniform_(0.5, 1.5)
          mod.bias.normal_(0, 0.1)

  def interpolate_pos_encoding(self, h, w):
    h0, w0 = h // P, w // P
    if (h0, w0) == (M, M):
      return self.pos_embed
    patch = self.pos_embed[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, mode="bicubic", antialias=False,
                          scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M))
    assert patch.shape[-2:] == (h0, w0)
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, D)
    return torch.cat([self.pos_embed[:, :1], patch], dim=1)

  def forward(self, x):  # (B, 3, H, W)
    b, _, h, w = x.shape
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    x = x + self.interpolate_pos_encoding(h, w)
    r = self.registers
    if r:
      x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1),
                     x[:, 1:]], dim=1)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return {"cls": x[:, 0], "registers": x[:, 1:r + 1], "patch": x[:, r + 1:]}


def _torch_model(registers=0, swiglu=False, seed=0):
  torch.manual_seed(seed)
  return TorchDINOv2(registers, swiglu).eval()


def _state_dict(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def apply_fn():
  # jit once per module; shapes and the module (static) select the traces.
  return jax.jit(lambda m, p, x: m.apply({"params": p}, x),
                 static_argnums=0)


def _compare(tmodel, apply_fn, shape, seed=1):
  model, params = convert_dinov2.params_from_torch(_state_dict(tmodel))
  x = np.random.default_rng(seed).standard_normal((2,) + shape + (3,))
  x = x.astype(np.float32)
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2))
  got = apply_fn(model, params, jnp.asarray(x))
  errors = {}
  for key in ("cls", "registers", "patch"):
    assert got[key].shape == tuple(want[key].shape), key
    errors[key] = float(np.max(np.abs(np.asarray(got[key])
                                      - want[key].numpy()), initial=0.0))
  assert max(errors.values()) < ATOL, errors
  return errors


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("shape", [(70, 70), (42, 42), (56, 84)],
                         ids=["stored", "smaller", "nonsquare"])
def test_matches_torch(registers, shape, apply_fn):
  tmodel = _torch_model(registers)
  model, _ = convert_dinov2.params_from_torch(_state_dict(tmodel))
  assert (model.hidden_size, model.depth, model.num_heads) == (D, DEPTH,
                                                               HEADS)
  assert (model.num_register_tokens, model.pos_grid, model.patch_size,
          model.ffn) == (registers, M, P, "mlp")
  _compare(tmodel, apply_fn, shape)


def test_swiglu_matches_torch(apply_fn):
  tmodel = _torch_model(swiglu=True)
  model, params = convert_dinov2.params_from_torch(_state_dict(tmodel))
  assert model.ffn == "swiglu"
  assert params["blocks_0"]["mlp"]["w3"]["kernel"].shape == (344, D)
  _compare(tmodel, apply_fn, (56, 84))


def test_chunked_blocks_and_backbone_prefix():
  """BlockChunk keys and "backbone." keys convert like the plain ones."""
  sd = _state_dict(_torch_model(registers=4))
  _, want = convert_dinov2.params_from_torch(sd)
  # block_chunks = depth: block i is blocks.i.i (chunk i, global index i).
  chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v
             for k, v in sd.items()}
  assert "blocks.1.1.norm1.weight" in chunked
  prefixed = {"teacher": {f"backbone.{k}": v for k, v in sd.items()}}
  prefixed["teacher"]["dino_head.last_layer.weight"] = torch.zeros(3)
  for variant in (chunked, prefixed):
    _, got = convert_dinov2.params_from_torch(variant)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_load_dinov2(tmp_path, apply_fn):
  tmodel = _torch_model(registers=4)
  path = str(tmp_path / "dinov2_tiny_pretrain.pth")
  torch.save(tmodel.state_dict(), path)
  model, params = convert_dinov2.load_dinov2(path, dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  assert params["pos_embed"].dtype == np.float32
  x = jnp.zeros((1, 42, 42, 3))
  out = apply_fn(model, params, x)
  assert out["patch"].shape == (1, 9, D) and out["patch"].dtype == jnp.bfloat16
  ref = apply_fn(model.clone(dtype=jnp.float32), params, x)
  np.testing.assert_allclose(np.asarray(out["patch"], np.float32),
                             ref["patch"], atol=0.1)


@pytest.mark.parametrize("m,grid", [(37, (16, 16)), (37, (18, 12)),
                                    (5, (7, 3)), (5, (9, 9)), (4, (4, 6))])
def test_pos_embed_resize_matches_torch(m, grid):
  pos = np.random.default_rng(m).standard_normal((m, m, 24))
  pos = pos.astype(np.float32)
  got = dinov2.interpolate_pos_embed(jnp.asarray(pos), grid)
  h, w = grid
  want = F.interpolate(
      torch.from_numpy(pos).permute(2, 0, 1)[None], mode="bicubic",
      align_corners=False, antialias=False,
      scale_factor=((h + 0.1) / m, (w + 0.1) / m))[0].permute(1, 2, 0)
  assert got.shape == tuple(want.shape) == (h, w, 24)
  np.testing.assert_allclose(got, want.numpy(), **INTERP_TOL)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("shape,size", [((256, 256), 224), ((33, 47), 28),
                                        ((20, 20), 48), ((30, 30), 30),
                                        ((512, 512), 224)])
def test_preprocess_matches_torch(shape, size, antialias):
  images = np.random.default_rng(size).integers(0, 256, (2,) + shape + (3,),
                                                dtype=np.uint8)
  got = jax.jit(dinov2.preprocess, static_argnums=(1, 2))(images, size,
                                                          antialias)
  # Without antialiasing jdit rounds the weights as torch's float32 kernel
  # does; the antialiased weights are exact (float64, then float32), so they
  # are compared with torch's float64 kernel, whose weights are exact too.
  dtype = torch.float64 if antialias else torch.float32
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0
  mean = torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
  want = F.interpolate((x - mean) / std, size=(size, size), mode="bicubic",
                       align_corners=False, antialias=antialias)
  assert got.shape == (2, size, size, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(),
                             **INTERP_TOL)
  # The same from float images in [0, 255].
  np.testing.assert_allclose(dinov2.preprocess(images.astype(np.float32),
                                               size, antialias), got, rtol=0,
                             atol=1e-6)


def test_bicubic_matrix_rows_sum_to_one():
  for n_in, n_out, scale in ((37, 16, 16.1 / 37), (7, 19, None)):
    mat = dinov2.bicubic_matrix(n_in, n_out, scale)
    assert mat.shape == (n_out, n_in)
    np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-6)


def test_antialiased_matrix_averages_every_source_pixel():
  """Shrinking 256 -> 8 (32 pixels per output): each output's weights cover
  its own 32 pixels and their neighbours, sum to 1, and a constant image
  stays constant; growing leaves the same-size case the identity."""
  mat = dinov2.antialiased_bicubic_matrix(256, 8)
  np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-6)
  assert (np.abs(mat[3, 96:128]) > 0).all()  # its own block, all of it
  assert (mat[3, :32] == 0).all() and (mat[3, 192:] == 0).all()
  np.testing.assert_array_equal(dinov2.antialiased_bicubic_matrix(9, 9),
                                np.eye(9, dtype=np.float32))


def test_released_shapes():
  """ViT-B/14 at REPA's 224px: 16 x 16 patch tokens from the 37 x 37 grid."""
  model = dinov2.DINOv2(hidden_size=768, depth=12, num_heads=12,
                        num_register_tokens=4)
  x = jnp.zeros((2, 224, 224, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert variables["params"]["pos_embed"].shape == (1, 1 + 37 * 37, 768)
  out = jax.eval_shape(model.apply, variables, x)
  assert out["patch"].shape == (2, 256, 768)
  assert out["registers"].shape == (2, 4, 768)
  assert dinov2.ffn_hidden(1536, 4.0, "swiglu") == 4096  # ViT-g/14's w3


def test_bad_images():
  model = dinov2.DINOv2(hidden_size=64, depth=1, num_heads=1, pos_grid=2)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 28, 28, 3)))
  for shape in ((1, 30, 28, 3), (1, 28, 28, 4), (28, 28, 3)):
    with pytest.raises(ValueError, match="images"):
      model.apply(params, jnp.zeros(shape))
  with pytest.raises(ValueError, match="images"):
    dinov2.preprocess(jnp.zeros((1, 8, 8)), 14)


def test_bad_state_dicts():
  sd = _state_dict(_torch_model())
  missing = dict(sd)
  del missing["blocks.1.attn.proj.bias"]
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"missing keys \(1\): blocks\.1\.attn\.proj\.bias"):
    convert_dinov2.params_from_torch(missing)
  misshaped = dict(sd, **{"blocks.0.mlp.fc2.weight": torch.zeros(D, 8)})
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"blocks\.0\.mlp\.fc2\.weight: checkpoint "
                           r"\(128, 8\), expected \(128, 512\)"):
    convert_dinov2.params_from_torch(misshaped)
  extra = dict(sd, **{"blocks.0.attn.extra": torch.zeros(2)})
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"unexpected keys \(1\): blocks\.0\.attn\.extra"):
    convert_dinov2.params_from_torch(extra)
  no_cls = {k: v for k, v in sd.items() if k != "cls_token"}
  with pytest.raises(ValueError, match="cls_token"):
    convert_dinov2.params_from_torch(no_cls)
  bad_pos = dict(sd, pos_embed=torch.zeros(1, 1 + 24, D))
  with pytest.raises(ValueError, match="pos_embed"):
    convert_dinov2.params_from_torch(bad_pos)  # 24 patches: not a square grid
