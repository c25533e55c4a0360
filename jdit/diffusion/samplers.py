"""Fixed-step ODE/SDE integrators for flow objectives (all ``lax.scan``).

Time runs from the noise end (t near 1) to the data end (t near 0), so steps
have negative ``dt = t_next - t``. The integrators only see callables:

* ``velocity(x, t)``: dx/dt of the probability-flow ODE at scalar ``t``;
* ``sde_drift(x, t)``: the reverse-time drift ``v - w(t) score`` (in dt);
* ``diffusion(t)``: w(t) >= 0, so that the noise per step is
  ``sqrt(2 w(t) |dt|) z`` (SiT's ``compute_diffusion`` convention).
"""
import jax
import jax.numpy as jnp


def _scan_steps(step, x, ts, keys=None):
  """Runs ``step(x, t, t_next[, key])`` over consecutive pairs of ``ts``."""
  ts = jnp.asarray(ts, jnp.float32)
  xs = (ts[:-1], ts[1:]) if keys is None else (ts[:-1], ts[1:], keys)

  def body(x, args):
    return step(x, *args), None

  x, _ = jax.lax.scan(body, x, xs)
  return x


def euler(velocity, x, ts):
  """Explicit Euler on the grid ``ts`` (len N+1 -> N evaluations)."""
  return _scan_steps(lambda x, t, tn: x + (tn - t) * velocity(x, t), x, ts)


def heun(velocity, x, ts):
  """Heun's second-order method (2 evaluations per step)."""

  def step(x, t, tn):
    dt = tn - t
    d = velocity(x, t)
    x_pred = x + dt * d
    return x + 0.5 * dt * (d + velocity(x_pred, tn))

  return _scan_steps(step, x, ts)


def euler_maruyama(sde_drift, diffusion, x, ts, key):
  """Euler-Maruyama for the reverse SDE on the grid ``ts``."""
  keys = jax.random.split(key, len(ts) - 1)

  def step(x, t, tn, k):
    dt = tn - t
    z = jax.random.normal(k, x.shape, x.dtype)
    return (x + dt * sde_drift(x, t)
            + jnp.sqrt(2.0 * diffusion(t) * jnp.abs(dt)) * z)

  return _scan_steps(step, x, ts, keys)
