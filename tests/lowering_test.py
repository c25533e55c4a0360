"""Training and sampling of each family lower for CUDA and TPU from here.

The kernel tests lower each kernel alone. This lowers what `train.py` runs on
a GPU or TPU: make_train_step's jitted step (loss, gradient, AdamW, EMA,
donated state) at production width, token count and batch, in bfloat16,
under remat policies and on an 8-device mesh. It then checks that the
step reaches the Pallas kernels (not their CPU reference), that offload remat
puts residuals in host memory, and that expert parallelism all-to-alls.
Sampling (sample.py's Sampler: a DDIM loop with classifier-free guidance
and feature caching) must reach the kernels too. Depth is cut to two blocks
(LaMamba-Diff: one per stage), because every block of a model lowers alike.
"""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from jdit import diffusion, feature_cache, sampling, sharding
from jdit import train_state as ts
from jdit.models import build_model
from pallas_kernels import export_for

BATCH = 256  # the DiT recipe's global batch
# What a Pallas kernel lowers to, per platform.
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
SHALLOW = {"depth": 2}

CASES = {
    # name: (model overrides, remat, mesh, what else the lowering must hold)
    "DiT-XL/2": (SHALLOW, "offload", {"data": 8}, ("pinned_host",)),
    "DiT-XL/2-local": (SHALLOW, "full", {"data": 4, "tensor": 2}, ()),
    "DiT-XL/2-linear": (SHALLOW, "dots_saveable", {"data": 8}, ()),
    "DiM-XL/2": (SHALLOW, "full", {"data": 2, "fsdp": 4}, ()),
    "LaMamba-Diff-XL": ({"depths": (1, 1, 1)}, "full", {"data": 8}, ()),
    "DiT-MoE-XL/2-8E2A": (SHALLOW, "none", {"data": 2, "expert": 4},
                          ("all_to_all",)),
}


def _setup(name):
  overrides, remat, mesh_sizes, _ = CASES[name]
  model = build_model(name, dtype="bfloat16", remat=remat, input_size=32,
                      in_channels=4, **overrides)
  objective = diffusion.create("ddpm", diffusion.default_config(),
                               learn_sigma=model.learn_sigma)
  tx = ts.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0,
      warmup_steps=0, schedule="constant")), 100)[0]
  mesh = sharding.create_mesh(mesh_sizes, jax.devices()[:8])
  state = ts.abstract_state(model, tx, mesh, sharding.DEFAULT_RULES)
  return model, objective, tx, mesh, state


def _check_kernels(model, text, platform, what):
  # Dense attention is splash (Pallas) on TPU; on CUDA it is cuDNN's, which
  # is chosen when traced on a GPU host and is XLA's attention from here.
  if platform == "tpu" or getattr(model, "mixer", None) != "attention":
    assert KERNEL_CALL[platform] in text, (
        f"{what} on {platform}: no Pallas kernel")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_train_step_lowers(name, platform):
  model, objective, tx, mesh, state = _setup(name)
  rules = sharding.DEFAULT_RULES
  step = ts.make_train_step(model, objective, tx, ema_decay=0.9999,
                            grad_accum=1, seed=0, mesh=mesh, rules=rules)
  rows = sharding.batch_sharding(mesh)
  batch = {"x": jax.ShapeDtypeStruct((BATCH,) + model.input_shape,
                                     jnp.float32, sharding=rows),
           "y": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=rows)}
  with sharding.use_mesh(mesh, rules):
    text = export_for(step, platform, state, batch).mlir_module()
  _check_kernels(model, text, platform, f"{name}'s train step")
  for needle in CASES[name][3]:
    assert needle in text, f"{name} on {platform}: no {needle}"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", ["DiM-XL/2", "DiT-XL/2-local",
                                  "LaMamba-Diff-XL"])
def test_sampling_lowers(name, platform):
  model, objective, _, mesh, state = _setup(name)
  model = model.clone(remat="none")
  guidance = diffusion.Guidance(scale=1.5, null_label=model.num_classes)
  sampler = sampling.Sampler(
      model, objective, state.params, mesh=mesh, sampler="ddim", steps=10,
      guidance=guidance, cache=feature_cache.FeatureCache(interval=2))
  labels = jax.ShapeDtypeStruct((64,), jnp.int32,
                                sharding=sharding.batch_sharding(mesh))
  with sharding.use_mesh(mesh):
    text = export_for(sampler._run, platform, state.params, None,  # pylint: disable=protected-access
                      jax.random.key(0), labels).mlir_module()
  _check_kernels(model, text, platform, f"{name}'s sampler")
