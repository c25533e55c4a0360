"""jdit.vae.AutoencoderKL vs diffusers' AutoencoderKL on random weights."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import convert, convert_vae, vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# float32 on both sides; differences come from summation order in the convs
# and GroupNorms over ~15 layers.
ATOL = 2e-4

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1,
             norm_num_groups=8, latent_channels=4)


def _torch_vae(seed=0, **kw):
  torch.manual_seed(seed)
  cfg = dict(SMALL, **kw)
  n = len(cfg["block_out_channels"])
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval()
  # Random non-default weights: GroupNorm affine and biases too, so every
  # parameter's mapping is exercised.
  with torch.no_grad():
    for p in model.parameters():
      fan_in = max(1, p[0].numel())
      p.copy_(torch.randn_like(p) * (1.0 / fan_in) ** 0.5)
    for mod in model.modules():
      if isinstance(mod, torch.nn.GroupNorm):
        mod.weight.copy_(1 + 0.1 * torch.randn_like(mod.weight))
        mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
  return model


def _flax(model_t, **kw):
  sd = model_t.state_dict()
  module = convert_vae.vae_module_for(sd, **kw)
  params = convert.vae_params_from_torch(sd, **kw)
  return module, params


@pytest.fixture(scope="module")
def pair():
  model_t = _torch_vae()
  module, params = _flax(model_t, norm_num_groups=8)
  return model_t, module, params


def _apply(module, params, x, method):
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))
  return fn(params, jnp.asarray(x))


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_encode_matches_diffusers(pair):
  model_t, module, params = pair
  x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(
      np.float32)
  mean, logvar = _apply(module, params, x, "encode")
  with torch.no_grad():
    dist = model_t.encode(_nchw(x)).latent_dist
  assert mean.shape == (2, 8, 8, 4)
  np.testing.assert_allclose(mean, dist.mean.numpy().transpose(0, 2, 3, 1),
                             atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(logvar,
                             dist.logvar.numpy().transpose(0, 2, 3, 1),
                             atol=ATOL, rtol=ATOL)


def test_decode_matches_diffusers(pair):
  model_t, module, params = pair
  z = np.random.RandomState(1).normal(size=(2, 6, 5, 4)).astype(np.float32)
  out = _apply(module, params, z, "decode")
  with torch.no_grad():
    ref = model_t.decode(_nchw(z)).sample.clamp(-1, 1).numpy()
  assert out.shape == (2, 12, 10, 3)
  np.testing.assert_allclose(out, ref.transpose(0, 2, 3, 1), atol=ATOL,
                             rtol=ATOL)
  assert float(jnp.max(jnp.abs(out))) <= 1.0


def test_old_attention_key_names(pair):
  model_t, module, params = pair
  renames = {"to_q": "query", "to_k": "key", "to_v": "value",
             "to_out.0": "proj_attn"}
  old = {}
  for k, v in model_t.state_dict().items():
    for new, o in renames.items():
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{o}.")
    # Some old files store the attention projections as 1x1 convs.
    if ".attentions.0.query.weight" in k:
      v = v[:, :, None, None]
    old[k] = v
  params_old = convert.vae_params_from_torch(old, norm_num_groups=8)
  jax.tree.map(np.testing.assert_array_equal, params_old, params)


def test_three_level_config_and_no_attention():
  model_t = _torch_vae(seed=1, block_out_channels=(16, 32, 32),
                       layers_per_block=2, mid_block_add_attention=False)
  module, params = _flax(model_t, norm_num_groups=8)
  assert module.downsample_factor == 4 and not module.mid_block_attention
  z = np.random.RandomState(2).normal(size=(1, 3, 3, 4)).astype(np.float32)
  out = _apply(module, params, z, "decode")
  with torch.no_grad():
    ref = model_t.decode(_nchw(z)).sample.clamp(-1, 1).numpy()
  np.testing.assert_allclose(out, ref.transpose(0, 2, 3, 1), atol=ATOL,
                             rtol=ATOL)


def test_param_tree_matches_init(pair):
  _, module, params = pair
  init = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 8, 8, 3)))
  shapes = jax.tree.map(lambda a: a.shape, init["params"])
  assert jax.tree.map(lambda a: a.shape, params) == shapes


def test_errors():
  with pytest.raises(convert.CheckpointMismatchError,
                     match="not a diffusers AutoencoderKL"):
    convert.vae_params_from_torch({"x_embedder.proj.weight": np.zeros(3)})
  with pytest.raises(convert.CheckpointMismatchError,
                     match="not a CompVis/LDM AutoencoderKL state dict"):
    convert.vae_params_from_torch(
        {"encoder.down.0.block.0.norm1.weight": np.zeros(3)})
  sd = dict(_torch_vae().state_dict())
  del sd["decoder.conv_out.bias"]
  sd["encoder.extra"] = np.zeros(1)
  sd["encoder.mid_block.resnets.0.conv1.weight"] = np.zeros((64, 64, 1, 1))
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.vae_params_from_torch(sd, norm_num_groups=8)
  msg = str(e.value)
  assert "missing keys (1): decoder.conv_out.bias" in msg
  assert "unexpected keys (1): encoder.extra" in msg
  assert "encoder.mid_block.resnets.0.conv1.weight: checkpoint (64, 64, 1, 1)" \
      in msg


def test_load_vae_from_file_and_cli_dir(pair, tmp_path):
  import subprocess
  import sys
  from safetensors.torch import save_file
  model_t, module, params = pair
  weights = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file({k: v.contiguous() for k, v in model_t.state_dict().items()},
            str(weights))
  (tmp_path / "config.json").write_text(
      '{"_class_name": "AutoencoderKL", "norm_num_groups": 8, '
      '"scaling_factor": 0.5}')
  m1, p1, s1 = vae.load_vae(str(tmp_path))
  assert s1 == 0.5 and m1.norm_num_groups == 8
  jax.tree.map(np.testing.assert_array_equal, p1, params)
  out = tmp_path / "converted"
  subprocess.run([sys.executable, "-m", "jdit.convert", "vae", "--checkpoint",
                  str(weights), "--out", str(out)], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  m2, p2, s2 = vae.load_vae(str(out))
  assert (s2, m2.block_out_channels, m2.norm_num_groups) == (
      0.5, (32, 64), 8)
  jax.tree.map(np.testing.assert_array_equal, p2, params)


def test_bf16_decode_and_load_errors(pair, tmp_path):
  _, module, params = pair
  z = np.random.RandomState(3).normal(size=(1, 4, 4, 4)).astype(np.float32)
  ref = _apply(module, params, z, "decode")
  low = _apply(module.clone(dtype=jnp.bfloat16), params, z, "decode")
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, atol=5e-2)
  with pytest.raises(FileNotFoundError, match="neither a jdit VAE"):
    vae.load_vae(str(tmp_path))
  with pytest.raises(ValueError, match="decode expects unscaled latents"):
    module.apply({"params": params}, jnp.zeros((1, 4, 4, 3)),
                 method="decode")
