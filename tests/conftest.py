"""Test setup: 8 fake CPU devices for the sharding tests, and a compilation
cache shared by the session.

XLA_FLAGS must be set before jax initialises its backends, so it is set here,
at import time of the first conftest, before any test module imports jax.
The same is true of the cache settings, which jax reads from the environment.
"""
import os
import shutil
import tempfile

# The tests' programs are tiny and compiled once each, so compiling is most
# of their time: LLVM at -O1 compiles ~15% faster than the default -O2 and
# runs them as fast. Subprocesses that choose their own device count keep it.
FAST_COMPILE = "--xla_backend_optimization_level=1"
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (the tiny train step of every
# train.run test, a resumed run's step): a persistent compilation cache for
# the session makes each compile once. The controller creates it before the
# xdist workers start, so they inherit it, and removes it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="jdit-tests-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pathlib  # noqa: E402

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

# Orbax's replica-parallel saving splits each replicated array among its
# replicas, compiling a slice per array and device: 136 compiles (~3.5 s) in
# every save-run of the tiny model on 8 CPU devices, to spread writes over
# hosts that a test does not have. Tests save each array from one replica;
# tests that start python (multihost, bench/, sample.py) keep the default.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
    override=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def load_config(name: str, arg: str | None = None):
  """Loads configs/<name>.py and returns get_config(arg)."""
  from jdit.config_util import load_config as load  # after XLA_FLAGS is set
  return load(str(ROOT / "configs" / f"{name}.py"), arg)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir shared by the session (the digits get prepared once)."""
  path = tmp_path_factory.mktemp("tfds")
  os.environ["TFDS_DATA_DIR"] = str(path)
  return str(path)


@pytest.fixture
def tiny_config(tfds_dir):
  """The digits default shrunk to run a few steps in seconds."""
  c = load_config("default")
  c.data.data_dir = tfds_dir
  c.batch_size = 16
  c.total_steps = 4
  c.log_every = 1
  c.checkpoint_every = 2
  c.model.depth = 1
  c.model.hidden_size = 32
  c.model.num_heads = 2
  c.optim.warmup_steps = 1
  c.sample.per_class = 0
  return c


def random_params(model, seed: int = 0, scale: float = 0.1):
  """Params of `model` drawn as scale * N(0, 1) with numpy, every leaf
  non-zero (adaLN-Zero's init makes every DiT block the identity). Shapes
  come from eval_shape: an initialisation compiles for seconds on CPU."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  b = 1
  x = jnp.zeros((b,) + tuple(model.input_shape))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), x, jnp.zeros((b,)), jnp.zeros((b,), jnp.int32))[
          "params"]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(
      scale * rng.standard_normal(s.shape), s.dtype), shapes)


def tiny_vae(directory: str, size: int):
  """A random f8 AutoencoderKL of width 8, saved to `directory` (what
  jdit.vae.load_vae reads); returns (module, params)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jdit import vae  # pylint: disable=g-import-not-at-top
  module = vae.AutoencoderKL(block_out_channels=(8, 8, 8, 8),
                             layers_per_block=1, norm_num_groups=4)
  params = module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                       method="encode")["params"]
  vae.save_vae(directory, module, params)
  return module, params
