"""Timestep respacing with ADM / DiT ``space_timesteps`` semantics.

A respaced process keeps a subset S of the base T timesteps and redefines
``beta'_i = 1 - abar[s_i] / abar[s_{i-1}]`` so that its cumulative products
are exactly the base ``abar`` at the kept steps; the network is still called
with the ORIGINAL timestep ``s_i`` (``timestep_map``), as DiT's
``SpacedDiffusion`` does with ``rescale_timesteps=False``.
"""
import numpy as np

from jdit.diffusion import gaussian


def space_timesteps(num_timesteps, section_counts):
  """Which base timesteps to keep (ADM ``space_timesteps``).

  Args:
    num_timesteps: T, the base process length.
    section_counts: a string "ddimN" (the stride i such that
      ``range(0, T, i)`` has exactly N elements, the smallest such i), a
      comma-separated string "a,b,c" or a list of ints: the T steps are cut
      into equal sections (the first ``T % len`` one step longer) and
      section k keeps ``counts[k]`` evenly strided steps, rounded with
      Python's round-half-to-even exactly like ADM.

  Returns:
    A sorted list of kept timesteps.
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(
          f"Cannot create exactly {desired} steps with an integer stride "
          f"over {num_timesteps} timesteps.")
    section_counts = [int(x) for x in section_counts.split(",")]
  section_counts = [int(c) for c in section_counts]
  if not section_counts or min(section_counts) < 1:
    raise ValueError(f"Section counts must be >= 1, got {section_counts}.")
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start = 0
  steps = []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(
          f"Cannot divide a section of {size} steps into {count}.")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(steps))


def respace(base, use_timesteps):
  """A GaussianDiffusion over ``use_timesteps`` of ``base``.

  Args:
    base: a ``gaussian.GaussianDiffusion``.
    use_timesteps: iterable of kept base timesteps.

  Returns:
    ``(diffusion, timestep_map)``: the respaced process (same variance, loss
    and clipping settings) and an int array mapping its index to the base
    timestep.
  """
  use = set(int(t) for t in use_timesteps)
  new_betas, timestep_map = [], []
  last = 1.0
  for i, abar in enumerate(base.alphas_cumprod):
    if i in use:
      new_betas.append(1.0 - abar / last)
      last = abar
      timestep_map.append(i)
  diffusion = gaussian.GaussianDiffusion(
      np.array(new_betas), variance=base.variance, loss_type=base.loss_type,
      clip_denoised=base.clip_denoised)
  return diffusion, np.array(timestep_map, np.int32)
