"""Official PyTorch DiT checkpoints -> jdit params: parity and errors.

The PyTorch DiT below follows facebookresearch/DiT models.py (timm-style
attention with a fused qkv Linear, Conv2d patch embedding, a label table with
a null class, adaLN-Zero, unpatchify "nhwpqc->nchpwq"), written here so the
test needs no network. Weights are drawn at random, adaLN included, so every
parameter influences the output.
"""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import convert, convert_dit
from jdit.models import build_model
from jdit.models.embed import sincos_2d

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

# float32 on both sides; 2 blocks, O(1) activations.
ATOL = RTOL = 1e-4

SMALL = dict(depth=2, hidden_size=64, num_heads=4)


def _modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TorchAttention(tnn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = tnn.Linear(dim, 3 * dim)
    self.proj = tnn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
    x = attn.softmax(-1) @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TorchMlp(tnn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = tnn.Linear(dim, hidden), tnn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TorchBlock(tnn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.attn = TorchAttention(dim, heads)
    self.norm2 = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.mlp = TorchMlp(dim, 4 * dim)
    self.adaLN_modulation = tnn.Sequential(tnn.SiLU(),
                                           tnn.Linear(dim, 6 * dim))

  def forward(self, x, c):
    sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + ga.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sa, ca))
    return x + gm.unsqueeze(1) * self.feedforward(
        _modulate(self.norm2(x), sm, cm))

  def feedforward(self, x):
    return self.mlp(x)


class TorchFinal(tnn.Module):

  def __init__(self, dim, p, out):
    super().__init__()
    self.norm_final = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.linear = tnn.Linear(dim, p * p * out)
    self.adaLN_modulation = tnn.Sequential(tnn.SiLU(),
                                           tnn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(_modulate(self.norm_final(x), shift, scale))


class TorchDiT(tnn.Module):
  """facebookresearch/DiT's DiT, learn_sigma=True, as in the release."""

  def __init__(self, input_size, patch_size, in_channels, hidden_size, depth,
               num_heads, num_classes):
    super().__init__()
    self.p, self.out = patch_size, 2 * in_channels
    self.x_embedder = tnn.Module()
    self.x_embedder.proj = tnn.Conv2d(in_channels, hidden_size, patch_size,
                                      patch_size)
    self.t_embedder = tnn.Module()
    self.t_embedder.mlp = tnn.Sequential(tnn.Linear(256, hidden_size),
                                         tnn.SiLU(),
                                         tnn.Linear(hidden_size, hidden_size))
    self.y_embedder = tnn.Module()
    self.y_embedder.embedding_table = tnn.Embedding(num_classes + 1,
                                                    hidden_size)
    g = input_size // patch_size
    self.pos_embed = tnn.Parameter(
        torch.from_numpy(sincos_2d(hidden_size, g, g))[None],
        requires_grad=False)
    self.blocks = tnn.ModuleList(TorchBlock(hidden_size, num_heads)
                                 for _ in range(depth))
    self.final_layer = TorchFinal(hidden_size, patch_size, self.out)

  def timestep_embedding(self, t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

  def forward(self, x, t, y):
    x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    c = (self.t_embedder.mlp(self.timestep_embedding(t))
         + self.y_embedder.embedding_table(y))
    for block in self.blocks:
      x = block(x, c)
    x = self.final_layer(x, c)
    n, p, ch = x.shape[0], self.p, self.out
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(n, h, w, p, p, ch)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, ch, h * p, w * p)


def _torch_dit(input_size=8, patch_size=2, in_channels=4, num_classes=10,
               seed=0):
  torch.manual_seed(seed)
  model = TorchDiT(input_size, patch_size, in_channels, num_classes=num_classes,
                   **SMALL).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":  # random, adaLN-Zero layers included
        p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
  return model


def _torch_out(model_t, x, t, y):
  """The PyTorch model's output on channels-last numpy inputs, channels-last."""
  with torch.no_grad():
    out = model_t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                  torch.from_numpy(t), torch.from_numpy(y)).numpy()
  return out.transpose(0, 2, 3, 1)


def _ours(input_size=8, patch_size=2, in_channels=4, num_classes=10):
  return build_model(f"DiT-S/{patch_size}", input_size=input_size,
                     in_channels=in_channels, num_classes=num_classes,
                     **SMALL)


def _compare(model_t, sd, input_size=8, **kw):
  model = _ours(input_size=input_size, **kw)
  params = convert.dit_params_from_torch(
      sd, "DiT-S/2" if kw.get("patch_size", 2) == 2 else "DiT-S/4",
      input_size=input_size, num_classes=kw.get("num_classes", 10), **SMALL)
  rng = np.random.RandomState(0)
  x = rng.normal(size=(3, input_size, input_size, 4)).astype(np.float32)
  t = np.array([0.0, 17.5, 999.0], np.float32)
  y = np.array([1, 10, 7])  # 10 is the null (CFG) label
  out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                    jnp.asarray(y))
  ref = _torch_out(model_t, x, t, y)
  assert out.shape == (3, input_size, input_size, 8)
  assert np.abs(ref).mean() > 0.1  # a meaningful, non-degenerate output
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
  return params, model


@pytest.fixture(scope="module")
def torch_model():
  return _torch_dit()


def test_bare_state_dict_matches_pytorch(torch_model):
  params, model = _compare(torch_model, torch_model.state_dict())
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                        jnp.zeros((1,), jnp.int32))
  shapes = jax.tree.map(lambda a: a.shape,
                        jax.tree.map(np.asarray, params))
  assert shapes == jax.tree.map(lambda a: a.shape,
                                flax_unbox(init["params"]))
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))


def flax_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def test_train_checkpoint_uses_ema_and_numpy_values(torch_model):
  ema = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  junk = {k: np.zeros_like(v) for k, v in ema.items()}
  _compare(torch_model, {"model": junk, "ema": ema, "opt": {}, "args": None})
  # A REPA checkpoint (SiT + REPA) adds its training-only projector.
  repa = {"projectors.0.0.weight": np.ones((8, 4)),
          "projectors.0.4.bias": np.ones(3)}
  _compare(torch_model, {"ema": {**ema, **repa}})


def test_patch4_and_bf16_values():
  model_t = _torch_dit(input_size=16, patch_size=4, seed=1)
  _compare(model_t, model_t.state_dict(), input_size=16, patch_size=4)
  sd16 = {k: v.to(torch.bfloat16) for k, v in model_t.state_dict().items()}
  params = convert.dit_params_from_torch(sd16, "DiT-S/4", num_classes=10,
                                         **SMALL)
  # input_size inferred from pos_embed (4x4 patches of 4).
  assert params["final_layer"]["linear"]["kernel"].dtype == np.float32


def test_mismatch_lists_every_bad_key(torch_model):
  sd = dict(torch_model.state_dict())
  del sd["blocks.1.mlp.fc2.bias"]
  del sd["t_embedder.mlp.0.weight"]
  sd["blocks.0.attn.extra"] = torch.zeros(1)
  sd["blocks.1.attn.qkv.weight"] = torch.zeros(64, 64)
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.dit_params_from_torch(sd, "DiT-S/2", input_size=8,
                                  num_classes=10, **SMALL)
  msg = str(e.value)
  assert ("missing keys (2): blocks.1.mlp.fc2.bias, t_embedder.mlp.0.weight"
          in msg)
  assert "unexpected keys (1): blocks.0.attn.extra" in msg
  assert ("mis-shaped keys (1): blocks.1.attn.qkv.weight: checkpoint "
          "(64, 64), expected (192, 64)" in msg)


def test_wrong_model_size_and_pos_embed(torch_model):
  sd = torch_model.state_dict()
  with pytest.raises(convert.CheckpointMismatchError, match="mis-shaped"):
    convert.dit_params_from_torch(sd, "DiT-S/2", input_size=8,
                                  num_classes=10)  # full depth 12, width 384
  bad = dict(sd, pos_embed=sd["pos_embed"] + 0.1)
  with pytest.raises(convert.CheckpointMismatchError, match="pos_embed"):
    convert.dit_params_from_torch(bad, "DiT-S/2", input_size=8,
                                  num_classes=10, **SMALL)


def test_load_state_dict_files(torch_model, tmp_path):
  from safetensors.torch import save_file
  sd = torch_model.state_dict()
  torch.save({"ema": sd, "model": sd}, tmp_path / "ckpt.pt")
  save_file({k: v.contiguous() for k, v in sd.items()},
            str(tmp_path / "w.safetensors"))
  for name in ("ckpt.pt", "w.safetensors"):
    loaded = convert.load_state_dict(str(tmp_path / name))
    convert.dit_params_from_torch(loaded, "DiT-S/2", num_classes=10, **SMALL)
  with pytest.raises(FileNotFoundError):
    convert.load_state_dict(str(tmp_path / "missing.pt"))
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(ValueError, match="unsupported"):
    convert.load_state_dict(str(tmp_path / "w.txt"))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--override", "depth=2", "--override", "hidden_size=64",
        "--override", "num_heads=4", "--num_classes", "10"]


def _run(*args):
  proc = subprocess.run([sys.executable, *args], capture_output=True,
                        text=True, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_convert_cli_round_trip_to_samples(tmp_path):
  """Official-layout .pt -> convert CLI -> load_for_sampling -> sample.py."""
  diffusers = pytest.importorskip("diffusers")
  from safetensors.torch import save_file
  from jdit import checkpoint
  model_t = _torch_dit(input_size=4)
  sd = model_t.state_dict()
  torch.save({"model": sd, "ema": sd, "opt": {}, "args": None},
             tmp_path / "0000100.pt")
  torch.manual_seed(0)
  vae_t = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
      layers_per_block=1, norm_num_groups=4, latent_channels=4)
  vae_dir = tmp_path / "sd-vae-tiny"
  vae_dir.mkdir()
  save_file({k: v.contiguous() for k, v in vae_t.state_dict().items()},
            str(vae_dir / "diffusion_pytorch_model.safetensors"))
  (vae_dir / "config.json").write_text(
      '{"_class_name": "AutoencoderKL", "norm_num_groups": 4, '
      '"scaling_factor": 0.18215}')
  out = tmp_path / "converted"
  _run("-m", "jdit.convert", "dit", "--checkpoint",
       str(tmp_path / "0000100.pt"), "--model", "DiT-S/2", "--image_size",
       "8", "--vae", str(vae_dir), "--out", str(out), *TINY)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

  params, config = checkpoint.load_for_sampling(str(out))
  expected = convert.dit_params_from_torch(sd, "DiT-S/2", num_classes=10,
                                           **SMALL)
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert config.model.name == "DiT-S/2" and config.objective == "ddpm"
  assert (config.model.input_size, config.model.in_channels,
          config.model.num_classes, config.model.learn_sigma,
          config.model.depth) == (4, 4, 10, True, 2)
  assert config.vae.scale_factor == pytest.approx(0.18215)
  assert os.path.isfile(os.path.join(config.vae.path, "params.msgpack"))

  samples = tmp_path / "samples.npz"
  _run(os.path.join(REPO, "sample.py"), "--checkpoint", str(out),
       "--num_samples", "4", "--steps", "2", "--cfg_scale", "1.5",
       "--cfg_channels", "3", "--out", str(samples))
  with np.load(samples) as f:
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (4, 8, 8, 3)
    assert f["arr_1"].shape == (4,)


def test_convert_cli_errors(torch_model, tmp_path, capsys):
  from jdit import convert_cli
  torch.save(torch_model.state_dict(), tmp_path / "dit.pt")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("keep me")
  for args, message in [
      (["--out", str(tmp_path / "full")], "exists and is not empty"),
      (["--out", str(tmp_path / "o"), "--num_classes", "5"],
       "mis-shaped keys"),
      (["--out", str(tmp_path / "o"), "--override", "depth"],
       "key=value")]:
    with pytest.raises(SystemExit) as e:
      convert_cli.main(["dit", "--checkpoint", str(tmp_path / "dit.pt"),
                        "--model", "DiT-S/2", *TINY, *args])
    assert e.value.code == 1
    assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")  # nothing half-written
  assert (tmp_path / "full" / "x").read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["dit.pt", "full"]


@pytest.mark.parametrize("input_size", [32, 64])  # the 256 and 512 releases
def test_official_xl2_layout(input_size):
  """The key set and shapes expected of DiT-XL-2-{256,512}.pt."""
  layout = convert_dit._dit_torch_layout(  # pylint: disable=protected-access
      build_model("DiT-XL/2", input_size=input_size))
  shapes = {k: v[0] for k, v in layout.items()}
  assert len(shapes) == 292  # 4 + 280 (28 blocks x 10) + 4 + pos_embed 4
  assert shapes["pos_embed"] == (1, (input_size // 2) ** 2, 1152)
  assert shapes["x_embedder.proj.weight"] == (1152, 4, 2, 2)
  assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)
  assert shapes["t_embedder.mlp.0.weight"] == (1152, 256)
  assert shapes["blocks.27.attn.qkv.weight"] == (3456, 1152)
  assert shapes["blocks.27.adaLN_modulation.1.weight"] == (6912, 1152)
  assert shapes["final_layer.linear.weight"] == (32, 1152)  # 2*2*8
  n = sum(math.prod(s) for k, s in shapes.items() if k != "pos_embed")
  assert n == 674_834_720  # the paper's 675M


def test_depth_is_read_from_the_blocks(torch_model):
  """A depth-pruned checkpoint (TinyFusion's TinyDiT-D14 of DiT-XL/2)
  converts under its parent's name: the depth comes from the blocks."""
  sd = torch_model.state_dict()
  width = {"hidden_size": 64, "num_heads": 4, "num_classes": 10}
  overrides = convert.resolve_dit_overrides(sd, "DiT-S/2", **width)
  assert overrides["depth"] == 2 and overrides["input_size"] == 8
  params = convert.dit_params_from_torch(sd, "DiT-S/2", **width)
  assert sorted(k for k in params if k.startswith("blocks_")) == [
      "blocks_0", "blocks_1"]
  assert convert.resolve_dit_overrides(sd, "DiT-S/2", depth=3)["depth"] == 3
