"""Fixed-step ODE/SDE integrators for flow objectives (all ``lax.scan``).

Time runs from the noise end (t near 1) to the data end (t near 0), so steps
have negative ``dt = t_next - t``. The integrators only see callables:

* ``velocity(x, t, state) -> (v, state)``: dx/dt of the probability-flow ODE
  at scalar ``t``;
* ``sde_drift(x, t, state) -> (drift, state)``: the reverse-time drift
  ``v - w(t) score`` (in dt);
* ``diffusion(t)``: w(t) >= 0, so that the noise per step is
  ``sqrt(2 w(t) |dt|) z`` (SiT's ``compute_diffusion`` convention).

``state`` is the network's sampling state (e.g. cached features), carried
from each evaluation to the next; each integrator returns ``(x, state)``.
"""
import jax
import jax.numpy as jnp


def _scan_steps(step, x, state, ts, keys=None):
  """Runs ``step(x, state, t, t_next[, key])`` over consecutive pairs of
  ``ts``."""
  ts = jnp.asarray(ts, jnp.float32)
  xs = (ts[:-1], ts[1:]) if keys is None else (ts[:-1], ts[1:], keys)

  def body(carry, args):
    return step(*carry, *args), None

  carry, _ = jax.lax.scan(body, (x, state), xs)
  return carry


def euler(velocity, x, state, ts):
  """Explicit Euler on the grid ``ts`` (len N+1 -> N evaluations)."""

  def step(x, state, t, tn):
    v, state = velocity(x, t, state)
    return x + (tn - t) * v, state

  return _scan_steps(step, x, state, ts)


def heun(velocity, x, state, ts):
  """Heun's second-order method (2 evaluations per step)."""

  def step(x, state, t, tn):
    dt = tn - t
    d, state = velocity(x, t, state)
    d_next, state = velocity(x + dt * d, tn, state)
    return x + 0.5 * dt * (d + d_next), state

  return _scan_steps(step, x, state, ts)


def euler_maruyama(sde_drift, diffusion, x, state, ts, key):
  """Euler-Maruyama for the reverse SDE on the grid ``ts``."""
  keys = jax.random.split(key, len(ts) - 1)

  def step(x, state, t, tn, k):
    dt = tn - t
    z = jax.random.normal(k, x.shape, x.dtype)
    drift, state = sde_drift(x, t, state)
    return (x + dt * drift
            + jnp.sqrt(2.0 * diffusion(t) * jnp.abs(dt)) * z), state

  return _scan_steps(step, x, state, ts, keys)
