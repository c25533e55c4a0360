"""Pallas kernels under a mesh run per shard (jdit.models.kernel_sharding).

XLA cannot partition a Triton or Mosaic custom call, so without shard_map a
sharded jit would hand every device the global batch. These tests lower the
mixers' forward and backward for CUDA and TPU from the 8 fake CPU devices
and read the operand shapes of every Triton / Mosaic call; and they check
that the sharded Pallas path (interpret mode) computes what the unsharded
one does.
"""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jdit import sharding
from jdit.models import kernel_sharding
from jdit.models.mixers import get_mixer
from pallas_kernels import export_for

GRID = (8, 8)
DIM, HEADS, BATCH = 64, 4, 8
OPTIONS = {"local": {"window": 2}, "linear": {"conv_kernel": 0},
           "mamba": {"state": 4}}
# The kernels' custom calls and their operand types, per platform.
CALLS = {platform: re.compile(target + r".*?\}\s*:\s*\((.*?)\)\s*->", re.S)
         for platform, target in (
             ("cuda", r"custom_call @__gpu\$xla\.gpu\.triton"),
             ("tpu", r"custom_call @tpu_custom_call"))}
TENSOR = re.compile(r"tensor<((?:\d+x)+)[a-z0-9]+>")


def _mixer(name, impl="auto"):
  return get_mixer(name)(num_heads=HEADS, dtype=jnp.bfloat16, impl=impl,
                         **OPTIONS.get(name, {}))


def _loss_and_grad(mixer, grid=GRID):
  def loss(params, x):
    y = mixer.apply(params, x, grid_shape=grid)
    return jnp.sum(y.astype(jnp.float32) ** 2)
  return jax.value_and_grad(loss, argnums=(0, 1))


def _kernel_operand_elements(name, platform, mesh_sizes, devices=8,
                             grid=GRID):
  """Elements of the kernel calls' activation operands in the lowering."""
  mixer = _mixer(name)
  x = jnp.zeros((BATCH, math.prod(grid), DIM), jnp.bfloat16)
  params = nn.unbox(mixer.init(jax.random.PRNGKey(0), x, grid_shape=grid))
  mesh = sharding.create_mesh(mesh_sizes, jax.devices()[:devices])
  with sharding.use_mesh(mesh):
    f = jax.jit(_loss_and_grad(mixer, grid),
                in_shardings=(NamedSharding(mesh, P()),
                              sharding.batch_sharding(mesh)))
    text = export_for(f, platform, params, x).mlir_module()
  calls = CALLS[platform].findall(text)
  assert calls, f"no kernel call in the {name} lowering for {platform}"
  total = 0
  for operands in calls:
    for dims in TENSOR.findall(operands):
      shape = [int(d) for d in dims.rstrip("x").split("x")]
      # Activations; not the kernels' small tables (e.g. splash's 1x1x1
      # block masks, the same on every shard).
      if len(shape) >= 3 and math.prod(shape) > 1:
        total += math.prod(shape)
  return total


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_kernels_lower_per_shard(name, platform):
  count = lambda *a, **k: _kernel_operand_elements(name, platform, *a, **k)
  whole = count({}, devices=1)
  data = count({"data": 8})
  both = count({"data": 4, "tensor": 2})
  # Data parallel: each kernel sees 1/8 of the batch; tokens and channels
  # are padded the same way, so the operands shrink exactly 8-fold.
  assert data * 8 == whole
  # Data x tensor: batch / 4 and heads (or Mamba channels) / 2. Channel
  # padding to the kernel's tile may round a halved channel count up.
  assert both * 8 <= whole * 1.25, (both, whole)
  assert both * 4 <= whole


def test_dense_attention_runs_splash_per_shard_on_tpu():
  # 128 tokens: the shortest sequence splash attention takes.
  count = lambda *a, **k: _kernel_operand_elements(
      "attention", "tpu", *a, grid=(16, 8), **k)
  whole = count({}, devices=1)
  assert count({"data": 8}) * 8 == whole
  assert count({"data": 4, "tensor": 2}) * 8 == whole


@pytest.mark.parametrize("name", ["local", "mamba"])
def test_sharded_pallas_matches_unsharded(name):
  """The interpret-mode kernels under (data 4, tensor 2) equal 1 device."""
  mixer = get_mixer(name)(num_heads=HEADS, impl="pallas", **OPTIONS[name])
  x = jax.random.normal(jax.random.PRNGKey(0),
                        (BATCH, math.prod(GRID), DIM))
  params = nn.unbox(mixer.init(jax.random.PRNGKey(1), x, grid_shape=GRID))
  grad = jax.jit(_loss_and_grad(mixer))
  expected = grad(params, x)
  mesh = sharding.create_mesh({"data": 4, "tensor": 2}, jax.devices()[:8])
  with sharding.use_mesh(mesh):
    got = grad(params, jax.device_put(x, sharding.batch_sharding(mesh)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4), got, expected)


def test_axes_that_do_not_divide_are_dropped():
  mesh = sharding.create_mesh({"data": 4, "tensor": 2}, jax.devices()[:8])
  with sharding.use_mesh(mesh):
    spec = kernel_sharding._fit(("act_batch", None, "heads", None),
                                (6, 64, 3, 16), mesh)
    assert spec == P(None, None, None, None)
    spec = kernel_sharding._fit(("act_batch", None, "heads", None),
                                (8, 64, 4, 16), mesh)
    assert spec == P("data", None, "tensor", None)


def test_unknown_kernel_is_rejected():
  with pytest.raises(ValueError, match="no sharding layout"):
    kernel_sharding.kernel("local_attention_reference")
