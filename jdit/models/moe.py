"""Mixture-of-experts feed-forward for DiT blocks (DiT-MoE, Switch-DiT).

`MoE` replaces a block's MLP (`mlp="moe"`): a float32 router picks the top-k
of `num_experts` expert MLPs per token, each expert takes at most `capacity`
tokens per group (one group = one sample's sequence, so routing never depends
on how the batch is split over devices), overflowing tokens are dropped in
training (they get only the shared experts; the block's residual carries them
on) but not in sampling (`eval_capacity_factor`), and
`num_shared_experts` always-on experts see every token (DiT-MoE).

Experts are one stacked weight per layer with logical axis "expert" on the
leading dim. Under a mesh whose `expert` axis has size > 1, dispatch and
combine run inside `shard_map`: tokens are dispatched locally to
(experts, groups, capacity) buffers, an all-to-all sends each expert's
buffer to the device that holds the expert, the local experts run, and a
second all-to-all brings the outputs back for the local combine. Routing and
auxiliary losses are computed outside the shard_map with the same code as
the single-device path (jdit/models/moe_routing.py), so both give the same
routing and losses.

Dispatch and combine are one-hot einsums over (B, L, E, C) masks, as in
GShard/flaxformer: about 4% of the expert FLOPs for DiT-MoE-XL/2 at 256
tokens, but the masks are kept for the backward pass; a sort-based (ragged)
dispatch would avoid them at long sequence lengths.

References: Fei et al., "Scaling Diffusion Transformers to 16 Billion
Parameters" (DiT-MoE, arXiv 2407.11633); Fedus et al., Switch Transformer;
Lepikhin et al., GShard (capacity, priority by choice); Zoph et al., ST-MoE
(router z-loss); Park et al., "Switch Diffusion Transformer" (arXiv
2403.09176, diffusion prior loss).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jdit import sharding
from jdit.models.feedforward import register_feedforward
from jdit.models.embed import dense
# Re-exported: the routing math is part of this module's API.
# pylint: disable-next=unused-import
from jdit.models.moe_routing import (Routing, balance_loss, capacity,
                                     js_divergence, prior_routes, route,
                                     z_loss)

DISPATCH_MODES = ("auto", "dense", "shard_map")
EXPERT_ACTS = ("gelu", "swiglu")
ROUTER_INPUTS = ("tokens", "tokens+c")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
# Names of the stacked (per-expert) parameters.
ROUTED_PARAMS = ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias",
                 "gate_kernel", "up_kernel", "down_kernel")


def expert_ffn(params: dict, x: jax.Array, act: str, dtype,
               tensor_axis: str | None = None) -> jax.Array:
  """Stacked expert MLPs: (E, N, D) -> (E, N, D).

  "gelu": fc1 -> GELU(tanh) -> fc2 with biases (the DiT Mlp per expert);
  "swiglu": down(silu(gate x) * up x) without biases (DiT-MoE's experts).
  With `tensor_axis` (inside shard_map) the hidden dim is split over that
  axis and the partial fc2 products are summed before the bias.
  """
  x = x.astype(dtype)
  w = lambda name: params[name].astype(dtype)
  if act == "gelu":
    h = jnp.einsum("end,edh->enh", x, w("fc1_kernel"))
    h = nn.gelu(h + w("fc1_bias")[:, None], approximate=True)
    y = jnp.einsum("enh,ehd->end", h, w("fc2_kernel"))
  else:
    h = nn.silu(jnp.einsum("end,edh->enh", x, w("gate_kernel")))
    h = h * jnp.einsum("end,edh->enh", x, w("up_kernel"))
    y = jnp.einsum("enh,ehd->end", h, w("down_kernel"))
  if tensor_axis is not None:
    y = jax.lax.psum(y, tensor_axis)
  if act == "gelu":
    y = y + w("fc2_bias")[:, None]
  return y


def _moe_dense(params, x, dispatch, combine, act, dtype):
  """Single-device (or XLA-partitioned) dispatch -> experts -> combine."""
  xin = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype), x.astype(dtype))
  e, g, c, d = xin.shape
  y = expert_ffn(params, xin.reshape(e, g * c, d), act, dtype)
  y = y.reshape(e, g, c, d)
  return jnp.einsum("gsec,egcd->gsd", combine.astype(y.dtype), y)


def _param_spec(name: str, ndim: int, tensor: str | None) -> P:
  # Expert dim over "expert"; the hidden dim over "tensor" (if split).
  if name in ("fc1_kernel", "gate_kernel", "up_kernel"):
    return P(EXPERT_AXIS, None, tensor)
  if name in ("fc2_kernel", "down_kernel"):
    return P(EXPERT_AXIS, tensor, None)
  if name == "fc1_bias":
    return P(EXPERT_AXIS, tensor)
  return P(EXPERT_AXIS, *([None] * (ndim - 1)))


def _moe_shard_map(params, x, dispatch, combine, act, dtype, mesh):
  """Expert-parallel dispatch/combine with all-to-all over `expert`."""
  n_expert = sharding.axis_size(mesh, EXPERT_AXIS)
  batch_axes = tuple(a for a in sharding.BATCH_AXES
                     if sharding.axis_size(mesh, a) > 1)
  n_batch = int(np.prod([sharding.axis_size(mesh, a) for a in batch_axes]))
  hidden = params["fc1_kernel" if act == "gelu" else "up_kernel"].shape[-1]
  t_size = sharding.axis_size(mesh, TENSOR_AXIS)
  tensor = TENSOR_AXIS if t_size > 1 and hidden % t_size == 0 else None
  # Groups are independent, so padding the batch to a multiple of the
  # shard count (e.g. a batch of 1 at init) changes nothing for real ones.
  b = x.shape[0]
  pad = -b % n_batch
  if pad:
    padding = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    x, dispatch, combine = padding(x), padding(dispatch), padding(combine)
  bspec = P(batch_axes or None)
  pspecs = {k: _param_spec(k, v.ndim, tensor) for k, v in params.items()}

  def local(p, x, dispatch, combine):
    xin = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype),
                     x.astype(dtype))                        # (E, g, C, D)
    if n_expert > 1:  # -> (E / n, n * g, C, D): my experts, all groups
      xin = jax.lax.all_to_all(xin, EXPERT_AXIS, 0, 1, tiled=True)
    e, g, c, d = xin.shape
    y = expert_ffn(p, xin.reshape(e, g * c, d), act, dtype, tensor)
    y = y.reshape(e, g, c, d)
    if n_expert > 1:
      y = jax.lax.all_to_all(y, EXPERT_AXIS, 1, 0, tiled=True)
    return jnp.einsum("gsec,egcd->gsd", combine.astype(y.dtype), y)

  specs = (pspecs, bspec, bspec, bspec)
  out = sharding.shard_map_call(local, (params, x, dispatch, combine), specs,
                                bspec, mesh)
  if pad and sharding.is_explicit(mesh):  # explicit shardings cannot slice a split dim
    out = jax.sharding.reshard(out, P())
  return out[:b] if pad else out


def _stacked_init(scale_axes):
  # Xavier-uniform per expert: the leading expert dim is a batch axis, not
  # part of fan-in/fan-out.
  return nn.initializers.variance_scaling(
      1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1,
      batch_axis=scale_axes)


@register_feedforward("moe")
class MoE(nn.Module):
  """Top-k mixture-of-experts MLP with shared experts and capacity.

  Call: `MoE(hidden=...)(x, c, deterministic, t=None)`, x (B, L, D), c (B, D)
  the block's conditioning vector, t (B,) timesteps (only for the prior
  loss). Returns (B, L, D). Auxiliary losses are sown, already weighted, into
  the "aux_loss" collection ("balance_loss", "z_loss", "prior_loss"); the
  per-expert load and the dropped fraction go to "intermediates".

  Attributes:
    hidden: the block's MLP width (D * mlp_ratio); the default expert width.
    num_experts: routed experts E.
    top_k: experts per token k (1 <= k <= E).
    num_shared_experts: always-on experts, fused into one MLP of width
      num_shared_experts * shared_expert_hidden.
    capacity_factor: slots per expert = ceil(k * L * factor / E) (> 0), in
      training.
    eval_capacity_factor: the same when deterministic (sampling,
      evaluation); None: E / k, so that no token loses an expert, as
      DiT-MoE's inference.
    expert_hidden: routed expert width (default `hidden`).
    shared_expert_hidden: width of one shared expert (default expert width;
      DiT-MoE uses D).
    expert_act: "gelu" (DiT Mlp: fc1 -> GELU tanh -> fc2, biases) or
      "swiglu" (DiT-MoE/DeepSeek experts, no biases).
    renormalize: rescale the top-k gates to sum to 1.
    router_input: "tokens" (DiT-MoE) or "tokens+c" (logits also get a linear
      map of silu(c), so routes depend on the timestep and label, as the
      Switch-DiT gate does).
    balance_loss_weight: alpha of the load-balance loss (DiT-MoE: 0.01).
    z_loss_weight: weight of the router z-loss.
    prior_loss_weight: weight of the Switch-DiT diffusion prior loss. What
      is implemented is a per-layer form of the paper's loss: the sample's
      mean router distribution over experts is pulled (Jensen-Shannon
      divergence) towards `prior_routes(t / prior_max_t)`, a window of k
      adjacent experts that slides with t^4, so nearby timesteps share
      routes. The paper applies it once over all layers' gates concatenated,
      with a Hungarian matching of experts to prior slots; here the expert
      order is fixed (a relabelling of freshly initialised experts). Needs t,
      which DiTBlock passes to feed-forwards with `uses_timesteps = True`.
    prior_max_t: the timestep that maps to the last window (999 for DDPM's
      integer steps, 1.0 for flow matching).
    dispatch: "auto" (shard_map when the context mesh has an expert axis of
      size > 1), "dense" (no shard_map) or "shard_map" (needs a mesh).
  """
  hidden: int
  num_experts: int = 8
  top_k: int = 2
  num_shared_experts: int = 0
  capacity_factor: float = 1.25
  eval_capacity_factor: float | None = None
  expert_hidden: int | None = None
  shared_expert_hidden: int | None = None
  expert_act: str = "gelu"
  renormalize: bool = False
  router_input: str = "tokens"
  balance_loss_weight: float = 0.01
  z_loss_weight: float = 1e-3
  prior_loss_weight: float = 0.0
  prior_max_t: float = 999.0
  dispatch: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # DiTBlock passes the timesteps t to feed-forwards that set this.
  uses_timesteps = True

  def __post_init__(self):
    super().__post_init__()
    check_options(self)

  @property
  def expert_width(self) -> int:
    return self.expert_hidden or self.hidden

  def macs(self, dim: int) -> int:
    """Multiply-adds per token as activated (the papers' count): the router,
    top_k routed experts and the shared ones. Capacity padding and the
    one-hot dispatch/combine einsums are extra work of this implementation
    (no-drop sampling runs every expert on every token: E / k times the
    routed count), not model FLOPs."""
    per_width = 3 if self.expert_act == "swiglu" else 2  # matmuls per expert
    shared = self.num_shared_experts * (self.shared_expert_hidden
                                        or self.expert_width)
    return dim * self.num_experts + per_width * dim * (
        self.top_k * self.expert_width + shared)

  def _expert_params(self, d: int) -> dict:
    e, h = self.num_experts, self.expert_width
    def param(name, shape, axes, init):
      return self.param(name, nn.with_logical_partitioning(init, axes),
                        shape, self.param_dtype)
    kernel = _stacked_init((0,))
    zeros = nn.initializers.zeros_init()
    if self.expert_act == "gelu":
      return {
          "fc1_kernel": param("fc1_kernel", (e, d, h),
                              ("expert", "embed", "mlp"), kernel),
          "fc1_bias": param("fc1_bias", (e, h), ("expert", "mlp"), zeros),
          "fc2_kernel": param("fc2_kernel", (e, h, d),
                              ("expert", "mlp", "embed"), kernel),
          "fc2_bias": param("fc2_bias", (e, d), ("expert", "embed"), zeros)}
    return {name: param(name, shape, axes, kernel) for name, shape, axes in (
        ("gate_kernel", (e, d, h), ("expert", "embed", "mlp")),
        ("up_kernel", (e, d, h), ("expert", "embed", "mlp")),
        ("down_kernel", (e, h, d), ("expert", "mlp", "embed")))}

  def _shared(self, x):
    width = self.num_shared_experts * (self.shared_expert_hidden
                                       or self.expert_width)
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.expert_act == "gelu":
      h = dense(width, ("embed", "mlp"), name="shared_fc1", **kw)(x)
      return dense(d, ("mlp", "embed"), name="shared_fc2", **kw)(
          nn.gelu(h, approximate=True))
    kw["use_bias"] = False
    h = nn.silu(dense(width, ("embed", "mlp"), name="shared_gate", **kw)(x))
    h = h * dense(width, ("embed", "mlp"), name="shared_up", **kw)(x)
    return dense(d, ("mlp", "embed"), name="shared_down", **kw)(h)

  @nn.compact
  def __call__(self, x, c=None, deterministic=True, t=None):
    b, s, d = x.shape
    e, k = self.num_experts, self.top_k
    # Checked before any parameter exists: creating a sharded expert
    # parameter would fail first, with a less helpful message.
    mesh = sharding.context_mesh()
    n_expert = sharding.axis_size(mesh, EXPERT_AXIS)
    use_shard_map = self.dispatch == "shard_map" or (
        self.dispatch == "auto" and n_expert > 1)
    if use_shard_map and mesh is None:
      raise ValueError("dispatch='shard_map' needs a mesh: run under "
                       "jax.set_mesh(mesh)")
    if e % n_expert:
      raise ValueError(f"num_experts {e} must be divisible by the mesh's "
                       f"'{EXPERT_AXIS}' axis size {n_expert}")
    # Router in float32: softmax/top-k on bf16 logits flips routes.
    logits = nn.Dense(e, use_bias=False, dtype=jnp.float32,
                      param_dtype=self.param_dtype,
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.variance_scaling(
                              1.0 / 3, "fan_in", "uniform"),
                          ("embed", None)),
                      name="router")(x.astype(jnp.float32))
    if self.router_input == "tokens+c":
      if c is None:
        raise ValueError("router_input='tokens+c' needs the conditioning c")
      logits = logits + nn.Dense(
          e, dtype=jnp.float32, param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.zeros_init(), ("embed", None)),
          bias_init=nn.with_logical_partitioning(
              nn.initializers.zeros_init(), (None,)),
          name="router_c")(nn.silu(c.astype(jnp.float32)))[:, None]
    factor = self.capacity_factor
    if deterministic:
      factor = self.eval_capacity_factor or e / k
    cap = capacity(s, e, k, factor)
    r = route(logits, k, cap, self.renormalize)

    if self.balance_loss_weight:
      self.sow("aux_loss", "balance_loss", self.balance_loss_weight
               * balance_loss(r.probs, r.expert_index))
    if self.z_loss_weight:
      self.sow("aux_loss", "z_loss", self.z_loss_weight * z_loss(logits))
    if self.prior_loss_weight:
      if t is None:
        raise ValueError("prior_loss_weight > 0 needs the timesteps t: call "
                         "the MoE as mlp(x, c, deterministic, t=t)")
      prior = prior_routes(jnp.asarray(t, jnp.float32) / self.prior_max_t,
                           e, k)
      self.sow("aux_loss", "prior_loss", self.prior_loss_weight * jnp.mean(
          js_divergence(jnp.mean(r.probs, axis=1), prior)))
    self.sow("intermediates", "expert_load", jnp.mean(
        jax.nn.one_hot(r.expert_index, e), axis=(0, 1, 2)))
    self.sow("intermediates", "dropped_fraction",
             1.0 - jnp.mean(r.kept.astype(jnp.float32)))

    params = self._expert_params(d)
    # The 0/1 mask is exact in any dtype; bf16 halves its memory.
    args = (params, x, r.dispatch.astype(self.dtype), r.combine,
            self.expert_act, self.dtype)
    if use_shard_map:
      y = _moe_shard_map(*args, mesh)
    else:
      y = _moe_dense(*args)
    if self.num_shared_experts:
      y = y + self._shared(x.astype(self.dtype))
    return y.astype(self.dtype)


def check_options(m) -> None:
  """Raises ValueError for bad MoE options (`m` has the MoE's fields)."""
  if m.num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got {m.num_experts}")
  if not 1 <= m.top_k <= m.num_experts:
    raise ValueError(f"top_k must be in [1, num_experts={m.num_experts}], "
                     f"got {m.top_k}")
  if not m.capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0, got {m.capacity_factor}")
  if m.eval_capacity_factor is not None and not m.eval_capacity_factor > 0:
    raise ValueError(f"eval_capacity_factor must be > 0 (or None: no "
                     f"dropping), got {m.eval_capacity_factor}")
  if m.num_shared_experts < 0:
    raise ValueError(f"num_shared_experts must be >= 0, got "
                     f"{m.num_shared_experts}")
  for name in ("hidden", "expert_hidden", "shared_expert_hidden"):
    value = getattr(m, name)
    if value is not None and value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  for name, value, allowed in (("dispatch", m.dispatch, DISPATCH_MODES),
                               ("expert_act", m.expert_act, EXPERT_ACTS),
                               ("router_input", m.router_input,
                                ROUTER_INPUTS)):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  for name in ("balance_loss_weight", "z_loss_weight", "prior_loss_weight"):
    if getattr(m, name) < 0:
      raise ValueError(f"{name} must be >= 0, got {getattr(m, name)}")
  if m.prior_max_t <= 0:
    raise ValueError(f"prior_max_t must be > 0, got {m.prior_max_t}")
