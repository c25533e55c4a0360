"""Routing math of the MoE feed-forward: capacity, top-k dispatch, losses.

Pure functions on float32 router logits, shared by the single-device and the
expert-parallel paths of `jdit.models.moe.MoE` (so both route identically).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def capacity(tokens_per_group: int, num_experts: int, top_k: int,
             capacity_factor: float) -> int:
  """Expert buffer size: ceil(k * tokens * factor / experts), in [1, tokens].

  No expert can receive more than `tokens_per_group` tokens (a token picks
  distinct experts), so larger buffers would only hold padding.
  """
  c = math.ceil(top_k * tokens_per_group * capacity_factor / num_experts)
  return int(min(max(c, 1), tokens_per_group))


class Routing(NamedTuple):
  dispatch: jax.Array      # (G, S, E, C) 0/1: token s goes to slot c of e
  combine: jax.Array       # (G, S, E, C) float32 gate weights of kept slots
  probs: jax.Array         # (G, S, E) float32 router softmax
  expert_index: jax.Array  # (G, S, k) chosen experts, best first
  kept: jax.Array          # (G, S, k) bool: the choice fit into capacity


def route(logits: jax.Array, top_k: int, cap: int,
          renormalize: bool = False) -> Routing:
  """Top-k routing with per-group capacity and token dropping.

  Slots are filled GShard-style: all tokens' first choices (in sequence
  order) before any second choice, so a token loses its k-th expert before
  any token loses a better one.

  Args:
    logits: (G, S, E) router logits (float32).
    top_k: experts per token.
    cap: slots per expert and group.
    renormalize: rescale the k gate values to sum to 1 (GShard); off, the
      raw softmax probabilities are the weights (DiT-MoE, Switch).

  Returns:
    A `Routing`.
  """
  g, s, e = logits.shape
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  gates, index = jax.lax.top_k(probs, top_k)                   # (G, S, k)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  onehot = jax.nn.one_hot(index, e, dtype=jnp.int32)           # (G, S, k, E)
  by_choice = onehot.transpose(0, 2, 1, 3).reshape(g, top_k * s, e)
  slot = jnp.cumsum(by_choice, axis=1) - 1
  slot = jnp.sum(slot * by_choice, axis=-1).reshape(g, top_k, s)
  slot = slot.transpose(0, 2, 1)                               # (G, S, k)
  kept = slot < cap
  onehot_e = onehot.astype(jnp.float32) * kept[..., None]
  onehot_c = jax.nn.one_hot(slot, cap, dtype=jnp.float32)
  dispatch = jnp.einsum("gske,gskc->gsec", onehot_e, onehot_c)
  combine = jnp.einsum("gske,gskc->gsec", onehot_e * gates[..., None],
                       onehot_c)
  return Routing(dispatch, combine, probs, index, kept)


def balance_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """E * sum_i f_i P_i (Switch/GShard; DiT-MoE eq. 5 without alpha).

  f_i is the fraction of the top-k choices that picked expert i (before
  capacity), P_i the mean router probability of expert i. Uniform routing
  gives the minimum, 1.
  """
  e = probs.shape[-1]
  f = jnp.mean(jax.nn.one_hot(expert_index, e, dtype=jnp.float32),
               axis=tuple(range(expert_index.ndim)))
  p = jnp.mean(probs, axis=tuple(range(probs.ndim - 1)))
  return e * jnp.sum(f * p)


def z_loss(logits: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32),
                                              axis=-1)))


def prior_routes(t_frac: jax.Array, num_experts: int, top_k: int,
                 alpha: float = 4.0) -> jax.Array:
  """Switch-DiT's diffusion prior per layer: (B,) t in [0, 1] -> (B, E).

  A window of k consecutive experts slides from expert 0 (t = 0) to the
  last k experts (t = 1), starting at round(t^alpha * (E - k)) as in the
  paper's Denoising Task Routing masks, so nearby timesteps share experts and
  distant ones do not. Each row is uniform over its window.
  """
  start = jnp.round(jnp.clip(t_frac, 0.0, 1.0) ** alpha
                    * (num_experts - top_k))
  e = jnp.arange(num_experts)
  mask = (e >= start[:, None]) & (e < start[:, None] + top_k)
  return mask.astype(jnp.float32) / top_k


def js_divergence(p: jax.Array, q: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Jensen-Shannon divergence along the last axis (natural log)."""
  m = 0.5 * (p + q)
  kl = lambda a: jnp.sum(a * (jnp.log(a + eps) - jnp.log(m + eps)), axis=-1)
  return 0.5 * (kl(p) + kl(q))
