"""Test setup: 8 fake CPU devices for the sharding tests.

XLA_FLAGS must be set before jax initialises its backends, so it is set here,
at import time of the first conftest, before any test module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
