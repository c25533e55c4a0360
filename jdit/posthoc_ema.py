"""Post-hoc EMA: choose the EMA length after training (EDM2).

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (CVPR 2024), section 3: the trainer keeps power-function EMAs of the
weights, each averaging the weights of step tau <= t with density
proportional to tau^gamma, whose relative width sigma_rel (standard
deviation / t) is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),

and saves snapshots of them every `config.posthoc_ema.every` steps (under
WORKDIR/posthoc_ema/). A power EMA of any other sigma_rel, at any snapshot
step, is then approximated by the least-squares combination of the stored
snapshots (their averaging profiles are the basis), without retraining:

    python -m jdit.posthoc_ema --workdir runs/x --sigma_rel 0.08 --out ckpt/x
    python sample.py --checkpoint ckpt/x ...

`--step` picks the snapshot step to reconstruct at (default: the last);
`--scan 0.03,0.05,0.08,0.12` writes one checkpoint per value under --out, for
an FID sweep. Each update uses beta_t = (1 - 1/t)^(gamma + 1) at step t
(counting from 1), so the EMA at step t is exactly
sum_tau [(tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1)] theta_tau.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jdit import checkpoint

SUBDIR = "posthoc_ema"
ITEMS = ("profiles", "meta")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent gamma > -1 of the power EMA with relative width sigma_rel.

  sigma_rel^2 (gamma+2)^2 (gamma+3) = gamma + 1 is a cubic in gamma; its
  largest real root is the one EDM2 uses (the narrow-profile branch).
  """
  if not float(sigma_rel) > 0:
    raise ValueError(f"sigma_rel must be > 0, got {sigma_rel}")
  s2 = float(sigma_rel) ** 2
  roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
  real = roots[np.abs(roots.imag) < 1e-9].real
  real = real[real > -1]
  if not real.size:
    raise ValueError(f"sigma_rel {sigma_rel} is wider than any power EMA "
                     f"(the widest, gamma ~ -0.38, has sigma_rel ~ 0.300)")
  return float(real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
  return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def ema_beta(step, gamma: float):
  """The decay after `step` updates (step >= 1): (1 - 1/step)^(gamma+1)."""
  t = jnp.asarray(step, jnp.float32)
  # exp(log1p): accurate where 1 - 1/t rounds in float32 (t ~ 1e7).
  return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def _profile_dot(t_a, gamma_a, t_b, gamma_b):
  """Inner products of the normalised averaging densities
  p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t], broadcast."""
  t_max = np.maximum(t_a, t_b)
  # (shorter / longer) ^ (the longer one's gamma): never above 1.
  ratio = (np.minimum(t_a, t_b) / t_max) ** np.where(t_a < t_b, gamma_b,
                                                     gamma_a)
  return (gamma_a + 1) * (gamma_b + 1) * ratio / (
      (gamma_a + gamma_b + 1) * t_max)


def solve_coefficients(steps, gammas, target_step: float,
                       target_gamma: float) -> np.ndarray:
  """Weights x minimising || sum_i x_i p_i - p_target ||_2 over the stored
  snapshot profiles p_i (snapshot step steps[i], exponent gammas[i])."""
  t = np.asarray(steps, np.float64)[:, None]
  g = np.asarray(gammas, np.float64)[:, None]
  gram = _profile_dot(t, g, t.T, g.T)
  rhs = _profile_dot(t[:, 0], g[:, 0], float(target_step),
                     float(target_gamma))
  return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def gammas_from_config(config: ml_collections.ConfigDict) -> tuple:
  """The power EMAs' exponents of config.posthoc_ema; () when it is off
  (every = 0 or no section). Checks the section, naming bad keys."""
  section = config.get("posthoc_ema")
  if not section or not section.get("every"):
    return ()
  every = section.every
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"config.posthoc_ema.every must be a positive integer "
                     f"(0 = off), got {every!r}")
  sigma_rels = tuple(section.get("sigma_rels", ()))
  if not sigma_rels:
    raise ValueError("config.posthoc_ema.sigma_rels is empty; EDM2 keeps "
                     "two, (0.05, 0.10)")
  try:
    return tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
  except ValueError as e:
    raise ValueError(f"config.posthoc_ema.sigma_rels: {e}") from e


def snapshot_manager(workdir: str, create: bool = True
                     ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(os.path.expanduser(workdir)), SUBDIR),
      options=options, item_names=ITEMS)


def save_snapshot(mngr: ocp.CheckpointManager, step: int, profiles,
                  sigma_rels, config_dict: dict) -> None:
  """Writes the power EMAs at `step` (a step already there is identical:
  training is deterministic, so a resumed run skips it)."""
  if step in mngr.all_steps():
    return
  mngr.save(step, args=ocp.args.Composite(
      profiles=ocp.args.StandardSave(tuple(profiles)),
      meta=ocp.args.JsonSave({"step": step, "sigma_rels": list(sigma_rels),
                              "config": config_dict})), force=True)
  mngr.wait_until_finished()


def reconstruct(workdir: str, sigma_rel: float, step: int | None = None):
  """(params, config, coefficients) of the power EMA of `sigma_rel` at
  snapshot `step` (default: the last), from the snapshots up to it.

  Sums one snapshot at a time on the host: memory is two copies of the
  params, whatever the number of snapshots.
  """
  mngr = snapshot_manager(workdir, create=False)
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(
        f"{mngr.directory} holds no post-hoc EMA snapshots; train with "
        f"--config.posthoc_ema.every=N (N > 0)")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"no snapshot at step {step}; snapshots: {steps}")
  used = [s for s in steps if s <= step]
  metas = {s: mngr.restore(s, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))["meta"] for s in used}
  rows = [(s, k, sigma_rel_to_gamma(r)) for s in used
          for k, r in enumerate(metas[s]["sigma_rels"])]
  coef = solve_coefficients([s for s, _, _ in rows], [g for *_, g in rows],
                            step, sigma_rel_to_gamma(sigma_rel))
  weight = {(s, k): x for (s, k, _), x in zip(rows, coef)}
  total = None
  for s in used:
    profiles = mngr.restore(s, args=ocp.args.Composite(
        profiles=ocp.args.StandardRestore(checkpoint.local_target(
            str(mngr.directory), s, "profiles"))))["profiles"]
    for k, profile in enumerate(profiles):
      part = jax.tree.map(
          lambda a, x=weight[s, k]: np.asarray(a, np.float64) * x, profile)
      total = part if total is None else jax.tree.map(np.add, total, part)
  params = jax.tree.map(lambda a: a.astype(np.float32), total)
  config = ml_collections.ConfigDict(metas[step]["config"])
  return params, config, coef


def main(argv=None) -> None:
  from jdit import checkpoint  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m jdit.posthoc_ema",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the training workdir")
  p.add_argument("--sigma_rel", type=float, default=None,
                 help="the EMA's relative width (EDM2's best: 0.05-0.15)")
  p.add_argument("--scan", default="",
                 help="comma-separated sigma_rels: one checkpoint each, in "
                      "--out/sigma_rel_<value>")
  p.add_argument("--step", type=int, default=None,
                 help="snapshot step (default: the last)")
  p.add_argument("--out", required=True, help="sampling checkpoint directory")
  args = p.parse_args(argv)
  try:
    if (args.sigma_rel is None) == (not args.scan):
      raise ValueError("give exactly one of --sigma_rel and --scan")
    values = ([args.sigma_rel] if args.sigma_rel is not None
              else [float(v) for v in args.scan.split(",") if v])
    for v in values:  # every value is checked before anything is written
      sigma_rel_to_gamma(v)
    for v in values:
      out = args.out if args.sigma_rel is not None else os.path.join(
          args.out, f"sigma_rel_{v:g}")
      params, config, coef = reconstruct(args.workdir, v, args.step)
      checkpoint.save_for_sampling(out, params, config,
                                   step=args.step or 0)
      print(f"sigma_rel {v:g}: {len(coef)} snapshot profiles, "
            f"coefficients sum {coef.sum():.4f} -> {out}", file=sys.stderr)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
