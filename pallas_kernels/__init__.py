"""Pallas kernels for the hot loops of efficient diffusion transformers.

`dot_product_attention` is dense attention through cuDNN (GPU) or jax's
splash attention (TPU), not a kernel of our own.

Each kernel is differentiable (jax.custom_vjp), has a pure-jnp reference, and
takes impl="auto" | "pallas" | "reference" (see _backend.py). `export_for`
exports a program that uses them for CUDA or TPU from any host.
"""
from pallas_kernels._backend import export_for
from pallas_kernels.dot_product_attention import dot_product_attention
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.local_attention import local_attention
