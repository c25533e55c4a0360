"""Timestep respacing against examples worked out by hand (ADM rules)."""
import numpy as np
import pytest

from jdit.diffusion import gaussian
from jdit.diffusion import respace


def test_ddim_stride():
  assert respace.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  # ceil(1000 / i) == 3 first holds at i = 334.
  assert respace.space_timesteps(1000, "ddim3") == [0, 334, 668]
  with pytest.raises(ValueError, match="exactly 7 steps"):
    respace.space_timesteps(10, "ddim7")


def test_sections_by_hand():
  # 100 steps, 3 sections of 34, 33, 33 steps (the first gets the extra one).
  # Section 0: stride 33/9 = 3.667 -> 0, 4, 7, 11, 15, 18, 22, 26, 29, 33.
  # Section 1 (starts at 34): stride 32/14 -> +0, 2, 5, 7, 9, 11, 14, 16, 18,
  #   21, 23, 25, 27, 30, 32.
  # Section 2 (starts at 67): stride 32/19 -> +0, 2, 3, 5, 7, 8, 10, 12, 13,
  #   15, 17, 19, 20, 22, 24, 25, 27, 29, 30, 32.
  s0 = [0, 4, 7, 11, 15, 18, 22, 26, 29, 33]
  s1 = [34 + i for i in (0, 2, 5, 7, 9, 11, 14, 16, 18, 21, 23, 25, 27, 30,
                         32)]
  s2 = [67 + i for i in (0, 2, 3, 5, 7, 8, 10, 12, 13, 15, 17, 19, 20, 22, 24,
                         25, 27, 29, 30, 32)]
  assert respace.space_timesteps(100, "10,15,20") == s0 + s1 + s2
  assert respace.space_timesteps(100, [10, 15, 20]) == s0 + s1 + s2


def test_round_half_to_even_like_adm():
  # Stride 2.5: Python's round(2.5) == 2, not 3.
  assert respace.space_timesteps(6, "3") == [0, 2, 5]
  # One step keeps timestep 0 (frac_stride = 1 for a single count).
  assert respace.space_timesteps(1000, "1") == [0]


def test_dit_250_steps():
  steps = respace.space_timesteps(1000, "250")
  assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
  assert steps[:4] == [0, 4, 8, 12]  # stride 999/249 = 4.012
  with pytest.raises(ValueError, match="Cannot divide"):
    respace.space_timesteps(10, "11")


def test_respaced_process_keeps_alphas_cumprod():
  base = gaussian.GaussianDiffusion(gaussian.get_beta_schedule("linear", 1000))
  use = respace.space_timesteps(1000, "10,15,20")
  spaced, tmap = respace.respace(base, use)
  np.testing.assert_array_equal(tmap, use)
  np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[use],
                             rtol=1e-12)
  # beta'_i = 1 - abar[s_i] / abar[s_{i-1}].
  np.testing.assert_allclose(
      spaced.betas[1:], 1 - base.alphas_cumprod[use][1:]
      / base.alphas_cumprod[use][:-1], rtol=1e-12)
  assert spaced.variance == base.variance
