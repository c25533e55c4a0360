"""CompVis/LDM AutoencoderKL (VA-VAE's layout) -> jdit.vae, and per-channel
latent normalisation.

The PyTorch reference is written here from the architecture (LDM's
taming-style Encoder/Decoder, same key names), small: ch 32, ch_mult
(1, 2, 2), attention at the lowest level (as VA-VAE's attn_resolutions [16]
at 256px), 8 latent channels, 8 GroupNorm groups.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jdit import convert, convert_cli, convert_vae, vae
from jdit import data
from jdit.data import latents

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

# float32 on both sides; differences come from summation order in ~30 convs,
# GroupNorms and attention softmaxes.
ATOL = 1e-4
GROUPS = 8
CH, CH_MULT, BLOCKS, Z = 32, (1, 2, 2), 2, 8
RESOLUTION = 16  # image side; levels work at 16, 8 and 4
ATTN_RESOLUTIONS = (4,)  # the lowest level, as VA-VAE's 16 of 256


def _norm(c):
  return nn.GroupNorm(GROUPS, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
    self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    if hasattr(self, "nin_shortcut"):
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head attention over positions with 1x1-conv projections."""

  def __init__(self, c):
    super().__init__()
    self.norm = _norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1)
                                             for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)
    k = self.k(y).reshape(b, c, h * w)                   # (b, c, hw)
    v = self.v(y).reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # (b, q, k)
    out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
    return x + self.proj_out(out)


class Downsample(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))  # right and bottom only


class Upsample(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.block_1, self.attn_1 = ResnetBlock(c, c), AttnBlock(c)
    self.block_2 = ResnetBlock(c, c)

  def forward(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level, h):
  """One level's resnets, each followed by its attention where it has one."""
  for j, block in enumerate(level.block):
    h = block(h)
    if len(level.attn):
      h = level.attn[j](h)
  return h


class Encoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv_in = nn.Conv2d(3, CH, 3, 1, 1)
    self.down = nn.ModuleList()
    cin, res = CH, RESOLUTION
    for i, mult in enumerate(CH_MULT):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(BLOCKS):
        level.block.append(ResnetBlock(cin, CH * mult))
        cin = CH * mult
        if res in ATTN_RESOLUTIONS:
          level.attn.append(AttnBlock(cin))
      if i != len(CH_MULT) - 1:
        level.downsample = Downsample(cin)
        res //= 2
      self.down.append(level)
    self.mid = Mid(cin)
    self.norm_out = _norm(cin)
    self.conv_out = nn.Conv2d(cin, 2 * Z, 3, 1, 1)  # double_z

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = _run_level(level, h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):

  def __init__(self):
    super().__init__()
    cin = CH * CH_MULT[-1]
    res = RESOLUTION // 2 ** (len(CH_MULT) - 1)
    self.conv_in = nn.Conv2d(Z, cin, 3, 1, 1)
    self.mid = Mid(cin)
    levels = []
    for i in reversed(range(len(CH_MULT))):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(BLOCKS + 1):
        level.block.append(ResnetBlock(cin, CH * CH_MULT[i]))
        cin = CH * CH_MULT[i]
        if res in ATTN_RESOLUTIONS:
          level.attn.append(AttnBlock(cin))
      if i != 0:
        level.upsample = Upsample(cin)
        res *= 2
      levels.insert(0, level)  # up[i] is level i, though built last-first
    self.up = nn.ModuleList(levels)
    self.norm_out = _norm(cin)
    self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

  def forward(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = _run_level(level, h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):

  def __init__(self):
    super().__init__()
    self.encoder, self.decoder = Encoder(), Decoder()
    self.quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1)
    self.post_quant_conv = nn.Conv2d(Z, Z, 1)

  def encode(self, x):
    mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))


@pytest.fixture(scope="module")
def torch_vae():
  torch.manual_seed(0)
  model = AutoencoderKL().eval()
  # Random non-default weights everywhere (GroupNorm affine and biases too),
  # so that every parameter's mapping is exercised.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (1.0 / max(1, p[0].numel())) ** 0.5)
    for mod in model.modules():
      if isinstance(mod, nn.GroupNorm):
        mod.weight.copy_(1 + 0.1 * torch.randn_like(mod.weight))
        mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
  return model


@pytest.fixture(scope="module")
def converted(torch_vae):
  sd = torch_vae.state_dict()
  module = convert_vae.vae_module_for(sd, norm_num_groups=GROUPS)
  params = convert.vae_params_from_torch(sd, norm_num_groups=GROUPS)
  return module, params


def _apply(module, params, x, method):
  return jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))(
      params, jnp.asarray(x))


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def test_config_is_read_off_the_weights(converted):
  module, _ = converted
  assert (module.block_out_channels, module.layers_per_block,
          module.latent_channels, module.attention_levels,
          module.mid_block_attention, module.downsample_factor) == (
              (32, 64, 64), 2, 8, (2,), True, 4)


def test_encode_matches_torch(torch_vae, converted):
  module, params = converted
  x = np.random.RandomState(0).uniform(-1, 1, (2, RESOLUTION, RESOLUTION, 3))
  mean, logvar = _apply(module, params, x.astype(np.float32), "encode")
  with torch.no_grad():
    ref_mean, ref_logvar = torch_vae.encode(_nchw(x.astype(np.float32)))
  assert mean.shape == (2, 4, 4, Z)
  np.testing.assert_allclose(mean, _nhwc(ref_mean), atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(logvar, _nhwc(ref_logvar), atol=ATOL, rtol=ATOL)


def test_decode_matches_torch(torch_vae, converted):
  module, params = converted
  z = np.random.RandomState(1).normal(size=(2, 4, 3, Z)).astype(np.float32)
  out = _apply(module, params, z, "decode")
  with torch.no_grad():
    ref = torch_vae.decode(_nchw(z)).clamp(-1, 1)
  assert out.shape == (2, 16, 12, 3)
  np.testing.assert_allclose(out, _nhwc(ref), atol=ATOL, rtol=ATOL)


def test_training_checkpoint_and_sd_prefix(torch_vae, converted):
  _, params = converted
  sd = torch_vae.state_dict()
  # A training checkpoint: loss and foundation-model weights are not the VAE.
  ckpt = {"state_dict": {**sd, "loss.logvar": torch.zeros(()),
                         "loss.discriminator.main.0.weight": torch.zeros(2),
                         "foundation_model.linear_proj.weight":
                             torch.zeros(2, 2)}, "global_step": 7}
  # A full latent-diffusion checkpoint: the VAE is its first stage.
  sd_full = {**{f"first_stage_model.{k}": v for k, v in sd.items()},
             "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
             "cond_stage_model.transformer.x": torch.zeros(2)}
  for state in (ckpt, sd_full):
    got = convert.vae_params_from_torch(state, norm_num_groups=GROUPS)
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_cli_writes_a_vae_that_loads_and_decodes_identically(
    torch_vae, converted, tmp_path):
  module, params = converted
  torch.save({"state_dict": torch_vae.state_dict()}, tmp_path / "vavae.pt")
  rng = np.random.RandomState(2)
  mean = rng.normal(size=(1, Z, 1, 1)).astype(np.float32)
  std = rng.uniform(0.5, 2.0, (1, Z, 1, 1)).astype(np.float32)
  torch.save({"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)},
             tmp_path / "latents_stats.pt")
  out = tmp_path / "converted"
  convert_cli.main(["vae", "--checkpoint", str(tmp_path / "vavae.pt"),
                    "--latent_stats", str(tmp_path / "latents_stats.pt"),
                    "--norm_num_groups", str(GROUPS), "--out", str(out)])
  loaded, loaded_params, scale = vae.load_vae(str(out))
  assert scale == 1.0  # LightningDiT's latent_multiplier
  assert loaded.attention_levels == (2,)
  np.testing.assert_allclose(loaded.latents_mean, mean.ravel(), rtol=1e-7)
  np.testing.assert_allclose(loaded.latents_std, std.ravel(), rtol=1e-7)
  z = rng.normal(size=(1, 4, 4, Z)).astype(np.float32)
  np.testing.assert_array_equal(_apply(loaded, loaded_params, z, "decode"),
                                _apply(module, params, z, "decode"))
  # decode_latents takes what a LightningDiT model samples: normalised z.
  x = (z - mean.reshape(Z)) / std.reshape(Z)
  np.testing.assert_allclose(
      _apply(loaded, loaded_params, x, "decode_latents"),
      _apply(module, params, z, "decode"), atol=1e-5)


def test_latent_normalisation_round_trip():
  rng = np.random.RandomState(3)
  mean, std = rng.normal(size=Z), rng.uniform(0.5, 2.0, Z)
  m = vae.AutoencoderKL(latent_channels=Z, latents_mean=tuple(mean),
                        latents_std=tuple(std), scale_factor=0.7)
  z = rng.normal(size=(2, 3, 3, Z)).astype(np.float32)
  x = m.normalize_latents(z)
  np.testing.assert_allclose(x, (z - mean) / std * 0.7, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m.denormalize_latents(x), z, rtol=1e-5,
                             atol=1e-5)
  sd = vae.AutoencoderKL()  # no per-channel stats: the scale factor alone
  np.testing.assert_allclose(sd.normalize_latents(z[..., :4]),
                             z[..., :4] * vae.SD_VAE_SCALE_FACTOR, rtol=1e-6)
  # The training pipeline normalises stored moments the same way.
  batch = {"latent_mean": z, "latent_std": np.zeros_like(z),
           "label": np.zeros(2, np.int64)}
  rngs = [np.random.default_rng(i) for i in range(2)]
  got, _ = latents.sample(batch, rngs, scale_factor=0.7,
                          latents_mean=tuple(mean), latents_std=tuple(std))
  np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6)


def test_bad_checkpoints_name_the_keys(torch_vae):
  sd = dict(torch_vae.state_dict())
  del sd["decoder.up.2.block.0.conv1.weight"]
  sd["encoder.down.0.extra.weight"] = torch.zeros(1)
  sd["encoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.vae_params_from_torch(sd, norm_num_groups=GROUPS)
  msg = str(e.value)
  assert "CompVis/LDM AutoencoderKL" in msg
  assert "missing keys (1): decoder.up.2.block.0.conv1.weight" in msg
  assert "unexpected keys (1): encoder.down.0.extra.weight" in msg
  assert ("encoder.mid.attn_1.q.weight: checkpoint (64, 64, 3, 3), expected "
          "(64, 64)") in msg
  only_encoder_attention = {k: v for k, v in torch_vae.state_dict().items()
                            if not k.startswith("decoder.up.2.attn.")}
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"encoder has attention at levels \(2,\) but the "
                           r"decoder at \(\)"):
    convert.vae_params_from_torch(only_encoder_attention,
                                  norm_num_groups=GROUPS)


def test_bad_latent_stats(torch_vae, tmp_path):
  torch.save({"state_dict": torch_vae.state_dict()}, tmp_path / "vavae.pt")
  torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)},
             tmp_path / "four.pt")
  torch.save({"mu": torch.zeros(Z), "sigma": torch.ones(Z)},
             tmp_path / "keys.pt")
  cmd = ["vae", "--checkpoint", str(tmp_path / "vavae.pt"),
         "--norm_num_groups", str(GROUPS), "--latent_stats"]
  with pytest.raises(ValueError, match=r"latents_mean has 4 values .*"
                     r"one per latent channel \(8,\)"):
    convert_vae.load_diffusers_vae(str(tmp_path / "vavae.pt"),
                                   norm_num_groups=GROUPS,
                                   latent_stats=str(tmp_path / "four.pt"))
  with pytest.raises(ValueError, match=r"must hold 'mean' and 'std'.*"
                     r"\['mu', 'sigma'\]"):
    convert_vae.read_latent_stats(str(tmp_path / "keys.pt"))
  # The CLI reports the same as one line and writes nothing.
  with pytest.raises(SystemExit):
    convert_cli.main(cmd + [str(tmp_path / "four.pt"), "--out",
                            str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="latents_std must be positive"):
    vae.AutoencoderKL(latent_channels=2, latents_mean=(0.0, 0.0),
                      latents_std=(1.0, 0.0))
  with pytest.raises(ValueError, match="must be given together"):
    vae.AutoencoderKL(latent_channels=2, latents_mean=(0.0, 0.0))
  with pytest.raises(ValueError, match="attention_levels"):
    vae.AutoencoderKL(attention_levels=(4,))


def test_latent_dataset_checks_the_normalisation(tmp_path):
  # extract_latents records the VAE's normalisation; a dataset registered
  # with other statistics refuses to open (before reading any example).
  stats = {"latent_shape": [2, 2, 2], "num_classes": 1, "image_size": 32,
           "scale_factor": 1.0, "latents_mean": [0.5, -0.5],
           "latents_std": [2.0, 3.0]}
  (tmp_path / latents.STATS_FILE).write_text(__import__("json").dumps(stats))
  common = dict(name="vavae_test", shape=(2, 2, 2), num_classes=1,
                scale_factor=1.0)
  with pytest.raises(ValueError, match=r"latents_mean is \[0.5, -0.5\], but "
                     r"dataset 'vavae_test' normalises with None"):
    latents.load("train", str(tmp_path), **common)
  with pytest.raises(ValueError, match="latents_std"):
    latents.load("train", str(tmp_path), latents_mean=(0.5, -0.5),
                 latents_std=(2.0, 1.0), **common)
  # The dataset "latents" takes the normalisation from the file instead.
  spec = data.get_spec("latents", str(tmp_path))
  assert spec.shape == (2, 2, 2) and spec.num_classes == 1
  z, _ = spec.to_model({"latent_mean": np.full((1, 2, 2, 2), 0.5),
                        "latent_std": np.zeros((1, 2, 2, 2)),
                        "label": np.zeros(1)}, [np.random.default_rng(0)])
  np.testing.assert_allclose(z[0, 0, 0], [0.0, 1.0 / 3.0])
  with pytest.raises(ValueError, match=r"latent dataset 'bad': latents_mean "
                     r"has 3 values"):
    latents.register("bad", 32, 1, latent_channels=2, downsample=16,
                     latents_mean=(0.0,) * 3, latents_std=(1.0,) * 3)


def test_vavae_f16d32_shapes():
  # VA-VAE's ddconfig: ch 128, ch_mult (1, 1, 2, 2, 4), 2 resnets, attention
  # at 16px of 256px (the last level), z 32: 256px -> 16x16x32.
  m = vae.AutoencoderKL(block_out_channels=(128, 128, 256, 256, 512),
                        latent_channels=32, attention_levels=(4,))
  out = jax.eval_shape(lambda x: m.init_with_output(
      jax.random.PRNGKey(0), x, method="encode"), jnp.zeros((1, 256, 256, 3)))
  (mean, _), variables = out
  assert mean.shape == (1, 16, 16, 32) and m.downsample_factor == 16
  enc = variables["params"]["encoder"]
  assert {"down_blocks_4_attentions_0", "down_blocks_4_attentions_1"} <= set(
      enc) and "down_blocks_3_attentions_0" not in enc
