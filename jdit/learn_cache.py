"""Learning-to-Cache: a learned schedule of which blocks to reuse when.

FORA's fixed interval (jdit.feature_cache) reuses every block alike, but
blocks differ in how fast their updates drift from one network evaluation to
the next, and so do the steps of a sampler. Learning-to-Cache (Ma et al.
2024, "Learning-to-Cache: Accelerating Diffusion Transformer via Layer
Caching") learns a router instead: one scalar per (evaluation, block),
beta = sigmoid(theta), input-independent, trained with the network frozen.
In training, block i at evaluation n outputs

    beta[n, i] * block(x_in) + (1 - beta[n, i]) * (x_in + u[i])

where u[i] is the update (output minus input) that block i's cache holds
at evaluation n, and the loss is the relative squared error of the network
output against the uncached output plus `sparsity` x mean(beta). Thresholding beta gives a
static table (computed iff beta > threshold) for feature_cache.FeatureCache
(schedule=...), used by sample.py --cache_router.

The training inputs are the network's own inputs along sampling runs of the
full model (the TrajectoryRecorder records x, t and y at every evaluation,
with the unconditional rows of guidance too), so the router learns the
sampler, step count and guidance it will serve. At sampling, a block
reused several times in a row adds the update of the last evaluation that
computed it, so u[i] is the full model's updates at evaluations n - 1 ...
n - window, weighted by the routers' odds of each being the last computed.
The paper takes the previous evaluation's (window = 1). The paper routes
attention and MLP separately; here the unit is a residual block
(jdit.models.block_hooks), which covers every DiT-family backbone.

Measured on the digits default (configs/default.py, 1500 steps; DDIM 20
steps, CFG 2, 64 recorded runs, 400 iterations; error = relative L2
distance of 32 samples from the uncached ones, same noise; CPU, 2026-11-24):

  schedule                          blocks computed   sample error
  FORA interval 2                   50%               0.038
  FORA interval 2, warmup 4         60%               0.039
  learned, window 1, sparsity 0.002 48%               0.172
  learned, window 8, sparsity 0.01  49%               0.049
  learned, window 8, sparsity 0.005 56%               0.040
  learned, window 19, sparsity 0.003 60%              0.026

With window 1 it learned to reuse every block for ten evaluations in a row;
with the staleness in the loss it matches FORA near half the compute and
beats it at 60%. The schedule depends on the model: score the samples.

  python -m jdit.learn_cache --checkpoint CKPT --sampler ddim --steps 50 \\
      --cfg_scale 1.5 --out router.json
  python sample.py --checkpoint CKPT --sampler ddim --steps 50 \\
      --cfg_scale 1.5 --cache_router router.json
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdit import checkpoint, diffusion, feature_cache, sampling, sharding
from jdit.models import block_hooks

ROUTER_FORMAT = "jdit.learn_cache/1"


class TrajectoryRecorder:
  """A stateful sampling network (as feature_cache.CachedNetwork) that
  computes the full model and records its inputs at every evaluation.

  Rows of the state: x ``(B, E, H, W, C)``, t ``(B, E)``, y ``(B,)`` and
  seen ``(B, E)`` (whether the row was evaluated then: under a guidance
  interval the unconditional rows skip some evaluations).
  """

  def __init__(self, model, params, evaluations: int):
    self.model, self.params, self.evaluations = model, params, evaluations

  def init_state(self, x, t, y):
    del t
    e, b = self.evaluations, x.shape[0]
    rows = (jnp.zeros((b, e) + x.shape[1:], x.dtype),
            jnp.zeros((b, e), jnp.float32), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, e), bool))
    return jnp.zeros((), jnp.int32), rows

  def __call__(self, x, t, y, state):
    count, (xs, ts, ys, seen) = state
    out = self.model.apply({"params": self.params}, x, t, y)
    n = jnp.minimum(count, self.evaluations - 1)
    rows = (xs.at[:, n].set(x.astype(xs.dtype)),
            ts.at[:, n].set(t.astype(jnp.float32)), y.astype(jnp.int32),
            seen.at[:, n].set(count < self.evaluations))
    return out, (count + 1, rows)


def _check_rows(mesh, **rows) -> None:
  """Each of `rows` (name=count) must split over the mesh's batch axes."""
  par = sharding.batch_parallelism(mesh)
  for name, n in rows.items():
    if n % par:
      raise ValueError(f"{name} must be a multiple of the {par} devices "
                       f"that share each batch, got {n}")


def _on_mesh(mesh, params, **rows):
  """(mesh, params replicated on it), `mesh` None meaning one device's;
  checks `rows` as _check_rows."""
  mesh = mesh or sharding.create_mesh({"data": 1}, jax.devices()[:1])
  _check_rows(mesh, **rows)
  return mesh, jax.device_put(params, sharding.NamedSharding(mesh,
                                                             sharding.P()))


def record(model, objective, params, labels, *, seed: int, sampler: str,
           steps: int, guidance, chunk: int, mesh=None
           ) -> dict[str, np.ndarray]:
  """Samples `labels` with the full model, `chunk` at a time, and returns
  the network inputs of every evaluation: x ``(R, E, H, W, C)``, t, seen
  ``(R, E)`` and y ``(R,)``, R = len(labels) rows, twice that with
  guidance (conditional rows, then unconditional). `mesh`: each chunk's
  runs are split over its batch axes (params replicated on it); None: one
  device."""
  mesh, params = _on_mesh(mesh, params, chunk=chunk, **{
      "the last chunk": len(labels) % chunk})
  evaluations = objective.evaluations(sampler, steps)

  @jax.jit
  def run(params, key, y):
    recorder = TrajectoryRecorder(model, params, evaluations)
    noise = jax.random.normal(jax.random.fold_in(key, 0),
                              (y.shape[0],) + model.input_shape)
    _, state = objective.sample(recorder, noise, jax.random.fold_in(key, 1),
                                y=y, sampler=sampler, steps=steps,
                                guidance=guidance, return_state=True)
    parts = state[1:3]  # the conditional rows [, the unconditional rows]
    return state[0], jax.tree.map(lambda *r: jnp.concatenate(r), *parts)

  out = []
  for c, start in enumerate(range(0, len(labels), chunk)):
    y = sharding.global_batch(
        {"y": np.asarray(labels[start:start + chunk], np.int32)}, mesh)["y"]
    with sharding.use_mesh(mesh):
      count, rows = run(params, jax.random.fold_in(jax.random.key(seed), c),
                        y)
    if int(count) != evaluations:
      raise AssertionError(f"{sampler} with {steps} steps made {int(count)} "
                           f"network evaluations, expected {evaluations}")
    out.append(jax.device_get(rows))
  x, t, y, seen = (np.concatenate(p) for p in zip(*out))
  return {"x": x, "t": t, "y": y, "seen": seen}


def _run_blocks(model, params, x, t, y, mix=None):
  """The network output and every block's update; with `mix = (beta (B, L),
  cached updates)`, block i's output is blended with its cached one."""
  updates = []

  def block_fn(i, call, x_in):
    out = call()
    updates.append(out - x_in)
    if mix is None:
      return out
    beta, cached = mix
    b = beta[:, i].reshape((-1,) + (1,) * (out.ndim - 1)).astype(out.dtype)
    return b * out + (1 - b) * (x_in + cached[i])

  out = block_hooks.apply_with_block_hook(model, {"params": params}, block_fn,
                                          x, t, y)
  return out, updates


def _stale_weights(beta, n, window: int):
  """Who fills the cache at evaluation n: weight of evaluation n - j (j = 1
  .. window) being the last one before n that computed the block,
  beta[n - j] * prod_{i < j} (1 - beta[n - i]), with the oldest in the
  window (or evaluation 0, which computes everything) taking what is
  left. beta ``(E, L)``, n ``(B,)`` -> ``(B, window, L)``."""
  beta = beta.at[0].set(1.0)
  weights, left = [], jnp.ones((n.shape[0], beta.shape[1]))
  for j in range(1, window + 1):
    k = jnp.maximum(n - j, 0)
    b = jnp.where((j == window) | (k == 0), 1.0, 0.0)[:, None]
    b = jnp.maximum(b, beta[k])
    weights.append(left * b)
    left = left * (1 - b)
  return jnp.stack(weights, 1)


def train_router(model, params, trajectories, *, iterations: int,
                 batch_size: int, lr: float, sparsity: float, seed: int,
                 channels: int, window: int = 8, init_logit: float = 3.0,
                 mesh=None):
  """Learns the router logits ``(E, L)`` on `trajectories` (record's).

  The update a reused block adds is, at sampling, that of the last
  evaluation that computed it. Training takes that staleness into account
  over `window` evaluations back: the cached update is the mix of the
  full model's updates at n - 1 ... n - window weighted by the routers'
  chances of each being the last computed (window = 1 is the paper's
  "previous evaluation" cache, which happily reuses a block for many
  evaluations in a row).

  Returns (logits, history): history holds per iteration the relative
  error and the mean beta of the batch. `mesh`: each batch is split over
  its batch axes; None: one device.
  """
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  mesh, params = _on_mesh(mesh, params, batch_size=batch_size)
  x, t, y, seen = (trajectories[k] for k in ("x", "t", "y", "seen"))
  e = x.shape[1]
  # (row, n) for n >= 1 with the row evaluated at n and the window before.
  back = np.clip(np.arange(e)[:, None] - np.arange(1, window + 1), 0, None)
  ok = seen & np.all(seen[:, back], axis=-1)
  ok[:, 0] = False
  pairs = np.argwhere(ok)
  if not len(pairs):
    raise ValueError("the trajectories hold no two consecutive evaluations")
  _, probe = jax.eval_shape(lambda a, b, c: _run_blocks(model, params, a, b, c),
                            x[:1, 0], t[:1, 0], y[:1])
  if not probe:
    raise ValueError(f"{type(model).__name__} has no blocks marked "
                     "residual_block = True; it cannot cache features")
  logits = jnp.full((e, len(probe)), init_logit, jnp.float32)
  tx = optax.adam(lr)

  @jax.jit
  def step(params, logits, opt_state, x_back, t_back, x_n, t_n, y_n, n):
    b = x_n.shape[0]  # x_back: (B * window, ...), row-major, so that a
    # device's rows of x_back are the past of its rows of x_n
    _, past = _run_blocks(model, params, x_back, t_back,
                          jnp.repeat(y_n, window))
    past = [u.reshape((b, window) + u.shape[1:]) for u in past]
    target = _run_blocks(model, params, x_n, t_n, y_n)[0][..., :channels]
    scale = jnp.mean(jnp.square(target))

    def loss_fn(logits):
      beta = jax.nn.sigmoid(logits)
      w = _stale_weights(beta, n, window)  # (B, window, L)
      cached = [jnp.einsum("bj,bj...->b...", w[:, :, i], u.astype(jnp.float32)
                           ).astype(u.dtype) for i, u in enumerate(past)]
      out = _run_blocks(model, params, x_n, t_n, y_n, (beta[n], cached))[0]
      err = jnp.mean(jnp.square(out[..., :channels] - target)) / scale
      return err + sparsity * jnp.mean(beta[n]), (err, jnp.mean(beta[n]))

    grads, aux = jax.grad(loss_fn, has_aux=True)(logits)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(logits, updates), opt_state, aux

  opt_state = tx.init(logits)
  history = []
  for it in range(iterations):
    pick = pairs[np.random.default_rng([seed, it]).integers(
        0, len(pairs), batch_size)]
    r, n = pick[:, 0], pick[:, 1]
    k = back[n].reshape(-1)  # per row: n - 1, n - 2, ..., n - window
    rr = np.repeat(r, window)
    batch = sharding.global_batch(dict(
        x_back=x[rr, k], t_back=t[rr, k], x_n=x[r, n], t_n=t[r, n], y_n=y[r],
        n=n.astype(np.int32)), mesh)
    with sharding.use_mesh(mesh):
      logits, opt_state, (err, mean_beta) = step(params, logits, opt_state,
                                                 **batch)
    history.append((float(err), float(mean_beta)))
  return np.asarray(logits), history


def schedule_from_logits(logits: np.ndarray, threshold: float
                         ) -> feature_cache.FeatureCache:
  """Computed iff beta > threshold; evaluation 0 computes every block."""
  if not 0.0 < threshold < 1.0:
    raise ValueError(f"threshold must be in (0, 1), got {threshold}")
  table = 1 / (1 + np.exp(-np.asarray(logits, np.float64))) > threshold
  table[0] = True
  return feature_cache.FeatureCache(schedule=tuple(map(tuple, table)))


def load_router(path: str, sampler: str, steps: int
                ) -> feature_cache.FeatureCache:
  """The schedule in a router file, checked against the sampler it runs."""
  try:
    with open(path) as f:
      router = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the cache router {path!r}: {e}") from e
  if router.get("format") != ROUTER_FORMAT:
    raise ValueError(f"{path!r} is not a router written by jdit.learn_cache")
  if (router["sampler"], router["steps"]) != (sampler, steps):
    raise ValueError(
        f"the cache router {path!r} was learned for sampler "
        f"{router['sampler']!r} with {router['steps']} steps, not "
        f"{sampler!r} with {steps}; pass those or learn another")
  return feature_cache.FeatureCache(schedule=tuple(
      tuple(bool(v) for v in row) for row in router["schedule"]))


def sample_error(model, objective, params, cache, labels, *, seed: int,
                 sampler: str, steps: int, guidance, mesh=None) -> float:
  """Relative L2 distance of samples drawn with `cache` from those of the
  full model, same noise and labels (split over `mesh` as in record)."""
  mesh, params = _on_mesh(mesh, params, labels=len(labels))

  def run(cache):
    return sampling.Sampler(model, objective, params, mesh=mesh,
                            sampler=sampler, steps=steps, guidance=guidance,
                            cache=cache)(jax.random.key(seed), labels)

  full, fast = run(None), run(cache)
  return float(np.linalg.norm(fast - full) / np.linalg.norm(full))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jdit.learn_cache",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="workdir or checkpoint dir (what sample.py reads)")
  p.add_argument("--sampler", default="",
                 help="'' = the checkpoint objective's default")
  p.add_argument("--steps", type=int, default=0, help="0 = default")
  p.add_argument("--cfg_scale", type=float, default=1.0)
  p.add_argument("--cfg_interval", default="0,1", help="'lo,hi'")
  p.add_argument("--num_samples", type=int, default=64,
                 help="sampling runs recorded as training data")
  p.add_argument("--chunk", type=int, default=16,
                 help="sampling runs per jitted recording call")
  p.add_argument("--iterations", type=int, default=500)
  p.add_argument("--batch_size", type=int, default=8,
                 help="(row, evaluation) pairs per router step")
  p.add_argument("--lr", type=float, default=0.05, help="Adam, on the logits")
  p.add_argument("--sparsity", type=float, default=0.02,
                 help="weight of mean(beta): higher reuses more")
  p.add_argument("--window", type=int, default=8,
                 help="evaluations back that a reused block's cache may "
                 "come from, in training")
  p.add_argument("--threshold", type=float, default=0.5,
                 help="a block is computed iff its beta exceeds this")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True, help="router .json to write")
  return p.parse_args(argv)


def learn(args: argparse.Namespace) -> dict:
  """Records, trains, thresholds and writes the router; returns it."""
  out = os.path.abspath(os.path.expanduser(args.out))
  if os.path.exists(out):
    raise FileExistsError(f"--out {out} exists; choose another path")
  for name in ("num_samples", "chunk", "iterations", "batch_size", "window"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
  try:
    interval = tuple(float(v) for v in args.cfg_interval.split(","))
  except ValueError as e:
    raise ValueError(f"--cfg_interval must be 'lo,hi', got "
                     f"{args.cfg_interval!r}") from e
  if not 0.0 < args.threshold < 1.0:
    raise ValueError(f"--threshold must be in (0, 1), got {args.threshold}")
  if jax.process_count() > 1:
    raise ValueError("jdit.learn_cache runs in one process (on all of its "
                     f"devices), not {jax.process_count()}")
  mesh = sharding.create_mesh({"data": -1})
  _check_rows(mesh, **{"--chunk": args.chunk, "--batch_size": args.batch_size,
                       "--num_samples % --chunk":
                       args.num_samples % args.chunk})
  params, config = checkpoint.load_for_sampling(args.checkpoint)
  model, objective = sampling.model_from_config(config)
  if "remat" in getattr(model, "__dataclass_fields__", {}):
    model = model.clone(remat="none")
  sampler, steps, _ = objective.check_sampler(args.sampler or None,
                                              args.steps or None, {})
  guidance = diffusion.Guidance(scale=args.cfg_scale,
                                null_label=model.num_classes,
                                interval=interval)
  sampling.check_cfg(model, guidance)
  labels = np.arange(args.num_samples) % model.num_classes
  run = dict(sampler=sampler, steps=steps, guidance=guidance, mesh=mesh)
  trajectories = record(model, objective, params, labels, seed=args.seed,
                        chunk=args.chunk, **run)
  logits, history = train_router(
      model, params, trajectories, iterations=args.iterations,
      batch_size=args.batch_size, lr=args.lr, sparsity=args.sparsity,
      seed=args.seed, channels=model.in_channels, window=args.window,
      mesh=mesh)
  cache = schedule_from_logits(logits, args.threshold)
  table = np.asarray(cache.schedule)
  router = {
      "format": ROUTER_FORMAT, "checkpoint": args.checkpoint,
      "sampler": sampler, "steps": steps, "cfg_scale": args.cfg_scale,
      "cfg_interval": list(interval), "evaluations": int(table.shape[0]),
      "blocks": int(table.shape[1]), "threshold": args.threshold,
      "sparsity": args.sparsity, "window": args.window,
      "computed_fraction": float(table.mean()),
      "final_relative_error": float(np.mean([h[0] for h in history[-20:]])),
      # Same noise and labels (the first chunk) with and without the cache.
      "sample_relative_error": sample_error(
          model, objective, params, cache, labels[:args.chunk],
          seed=args.seed + 1, **run),
      "schedule": table.astype(int).tolist(),
      "beta": (1 / (1 + np.exp(-logits))).round(4).tolist(),
  }
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump(router, f, indent=1)
  os.replace(out + ".tmp", out)
  return router


def main(argv=None) -> None:
  router = learn(parse_args(argv))
  print(json.dumps({k: router[k] for k in (
      "sampler", "steps", "evaluations", "blocks", "computed_fraction",
      "sample_relative_error")}))


if __name__ == "__main__":
  main()
