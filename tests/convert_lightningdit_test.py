"""LightningDiT checkpoints -> jdit: parity with PyTorch, the CLI, errors.

The PyTorch LightningDiT below restates hustvl/LightningDiT's model from its
paper and key names, on the DiT of tests/convert_test.py: RMSNorm with a
weight (`norm1/norm2/norm_final.weight`), a SwiGLU feed-forward whose `w12`
Linear holds [W1; W2] (`silu(x W1) * x W2`, then `w3`) of width
int(2/3 * 4D), optional per-head q/k norms, and EVA-02's 2D rotary embedding
stored as the buffers `feat_rope.freqs_{cos,sin}`. The rotary tables are
built here the EVA way (per-axis frequencies, each repeated for a channel
pair, rows then columns), independently of jdit.models.embed.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from convert_test import (TINY, TorchDiT, TorchFinal, TorchMlp, _modulate,
                          _torch_out)
from jdit import checkpoint, convert, convert_cli
from jdit.models import build_model

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

SMALL = dict(depth=2, hidden_size=64, num_heads=4)
SIZE, CHANNELS = 8, 8  # patch 1: an 8x8 token grid, head_dim 16
RELEASED = dict(norm="rms", mlp="swiglu", qk_norm=None)
VARIANTS = {
    "released": RELEASED,  # the published config: RMS, SwiGLU, RoPE
    "rms_qk_norm": dict(RELEASED, qk_norm="rms"),
    "layer_norms": dict(norm="layer", mlp="dense", qk_norm="layer"),
}


class TorchRMSNorm(tnn.Module):

  def __init__(self, dim):
    super().__init__()
    self.weight = tnn.Parameter(torch.ones(dim))

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _eva_rope_tables(half_head_dim, side):
  """EVA-02's VisionRotaryEmbeddingFast tables, (side * side, head_dim)."""
  freqs = 1.0 / 10000 ** (torch.arange(0, half_head_dim, 2)[
      :half_head_dim // 2].float() / half_head_dim)
  per_axis = torch.einsum("n,f->nf", torch.arange(side).float(), freqs)
  per_axis = per_axis.repeat_interleave(2, dim=-1)  # (n r), r = 2
  rows = per_axis[:, None, :].expand(side, side, -1)
  cols = per_axis[None, :, :].expand(side, side, -1)
  angles = torch.cat([rows, cols], dim=-1).reshape(side * side, -1)
  return angles.cos(), angles.sin()


def _rotate_half(x):
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)


class TorchRope(tnn.Module):

  def __init__(self, half_head_dim, side):
    super().__init__()
    cos, sin = _eva_rope_tables(half_head_dim, side)
    self.register_buffer("freqs_cos", cos)
    self.register_buffer("freqs_sin", sin)

  def forward(self, t):
    return t * self.freqs_cos + _rotate_half(t) * self.freqs_sin


class TorchAttention(tnn.Module):

  def __init__(self, dim, heads, qk_norm):
    super().__init__()
    self.heads, hd = heads, dim // heads
    self.qkv, self.proj = tnn.Linear(dim, 3 * dim), tnn.Linear(dim, dim)
    norm = {None: None, "rms": lambda: TorchRMSNorm(hd),
            "layer": lambda: tnn.LayerNorm(hd)}[qk_norm]
    self.q_norm = norm() if norm else tnn.Identity()
    self.k_norm = norm() if norm else tnn.Identity()

  def forward(self, x, rope):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TorchSwiGLU(tnn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.w12 = tnn.Linear(dim, 2 * hidden)
    self.w3 = tnn.Linear(hidden, dim)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


def _norm(kind, dim):
  if kind == "rms":
    return TorchRMSNorm(dim)
  return tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class TorchLightningBlock(tnn.Module):

  def __init__(self, dim, heads, norm, mlp, qk_norm):
    super().__init__()
    self.norm1, self.norm2 = _norm(norm, dim), _norm(norm, dim)
    self.attn = TorchAttention(dim, heads, qk_norm)
    self.mlp = (TorchSwiGLU(dim, int(2 / 3 * 4 * dim)) if mlp == "swiglu"
                else TorchMlp(dim, 4 * dim))
    self.adaLN_modulation = tnn.Sequential(tnn.SiLU(),
                                           tnn.Linear(dim, 6 * dim))

  def forward(self, x, c, rope):
    sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + ga.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sa, ca),
                                        rope)
    return x + gm.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sm, cm))


class TorchLightningDiT(TorchDiT):
  """LightningDiT, learn_sigma=False, patch 1, RoPE on."""

  def __init__(self, norm, mlp, qk_norm):
    super().__init__(SIZE, 1, CHANNELS, num_classes=10, **SMALL)
    d, heads = SMALL["hidden_size"], SMALL["num_heads"]
    self.out = CHANNELS
    self.feat_rope = TorchRope(d // heads // 2, SIZE)
    self.blocks = tnn.ModuleList(
        TorchLightningBlock(d, heads, norm, mlp, qk_norm)
        for _ in range(SMALL["depth"]))
    self.final_layer = TorchFinal(d, 1, CHANNELS)
    self.final_layer.norm_final = _norm(norm, d)

  def forward(self, x, t, y):
    x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    c = (self.t_embedder.mlp(self.timestep_embedding(t))
         + self.y_embedder.embedding_table(y))
    for block in self.blocks:
      x = block(x, c, self.feat_rope)
    x = self.final_layer(x, c)  # patch 1: tokens are pixels
    n = x.shape[0]
    return x.transpose(1, 2).reshape(n, self.out, SIZE, SIZE)


def _torch_lightning(variant, seed=0):
  torch.manual_seed(seed)
  model = TorchLightningDiT(**VARIANTS[variant]).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":  # random, norms and adaLN-Zero included
        scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5 + scale)
  return model


def _overrides(variant):
  v = VARIANTS[variant]
  options = {"rope": True, **({"qk_norm": v["qk_norm"]} if v["qk_norm"]
                              else {})}
  return dict(SMALL, input_size=SIZE, in_channels=CHANNELS, num_classes=10,
              norm=v["norm"], mlp=v["mlp"], mixer_options=options)


def _inputs():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(3, SIZE, SIZE, CHANNELS)).astype(np.float32)
  t = np.array([0.0, 0.4, 1.0], np.float32)
  y = np.array([1, 10, 7])  # 10 is the null (CFG) label
  return x, t, y


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_matches_pytorch(variant):
  model_t = _torch_lightning(variant)
  sd = model_t.state_dict()
  assert "feat_rope.freqs_cos" in sd  # buffers are saved with the weights
  params = convert.dit_params_from_torch(sd, "LightningDiT-B/1",
                                         **_overrides(variant))
  model = build_model("LightningDiT-B/1", **_overrides(variant))
  x, t, y = _inputs()
  out = model.apply({"params": params}, *(jnp.asarray(a) for a in (x, t, y)))
  ref = _torch_out(model_t, x, t, y)
  assert np.abs(ref).mean() > 0.1  # a meaningful, non-degenerate output
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_rope_changes_the_output():
  # Guards the parity test: without RoPE the same weights give another
  # output, so the rotary tables are really being compared.
  model_t = _torch_lightning("released")
  kw = _overrides("released")
  params = convert.dit_params_from_torch(model_t.state_dict(),
                                         "LightningDiT-B/1", **kw)
  no_rope = build_model("LightningDiT-B/1", **dict(kw, mixer_options={}))
  x, t, y = _inputs()
  out = no_rope.apply({"params": params}, *(jnp.asarray(a) for a in (x, t, y)))
  assert np.abs(np.asarray(out) - _torch_out(model_t, x, t, y)).max() > 1e-2


def test_errors_name_what_does_not_fit():
  sd = _torch_lightning("released").state_dict()
  kw = _overrides("released")
  # A checkpoint trained on another grid: its RoPE tables differ.
  other = dict(sd, **{k: torch.zeros_like(v) for k, v in sd.items()
                      if k.startswith("feat_rope.")})
  with pytest.raises(convert.CheckpointMismatchError,
                     match="feat_rope.freqs_cos.*rotary table"):
    convert.dit_params_from_torch(other, "LightningDiT-B/1", **kw)
  # The LightningDiT weights under DiT's layout: every extra key is named.
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"(?s)missing keys.*mlp\.fc1.*unexpected keys.*"
                           r"blocks\.0\.mlp\.w12\.weight.*norm1\.weight"):
    convert.dit_params_from_torch(
        sd, "DiT-S/2", **dict(SMALL, patch_size=1, input_size=SIZE,
                              in_channels=CHANNELS, num_classes=10,
                              learn_sigma=False))


def test_cli_writes_a_sampling_checkpoint(tmp_path):
  model_t = _torch_lightning("released")
  torch.save({"ema": model_t.state_dict(), "opt": {}},
             tmp_path / "lightningdit.pt")
  out = tmp_path / "converted"
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "lightningdit.pt"),
                    "--model", "LightningDiT-B/1", "--objective", "sit",
                    "--override", f"in_channels={CHANNELS}", *TINY,
                    "--out", str(out)])
  params, config = checkpoint.load_for_sampling(str(out))
  assert config.objective == "flow" and config.diffusion.flow.model_time_flip
  assert config.model.name == "LightningDiT-B/1"
  from jdit.sampling import model_from_config
  model, _ = model_from_config(config)
  assert (model.norm, model.mlp, model.learn_sigma) == ("rms", "swiglu",
                                                        False)
  x, t, y = _inputs()
  got = model.apply({"params": params}, *(jnp.asarray(a) for a in (x, t, y)))
  np.testing.assert_allclose(got, _torch_out(model_t, x, t, y), atol=1e-4,
                             rtol=1e-4)
