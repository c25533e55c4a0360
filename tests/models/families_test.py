"""Named efficient-DiT models and the FLOP counter."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax.core import unfreeze
from flax.traverse_util import flatten_dict

from jdit import models
from jdit.models.families import FAMILY_MODELS
from jdit.models.flops import DIT_PAPER_GMACS, xla_flops
from jdit.models.mixers import MIXERS
from jdit.models.registry import MODELS, smoke_overrides

# Options sized for the 8x8 token grid of a 16x16 input at patch 2.
TEST_OPTIONS = {
    "local": {"window": 2},
    "window": {"window": 4, "shift": 2},
    "proxy": {"proxy_window": 2, "window": 4, "shift": 2},
}

# XLA counts every op and unrolls nothing: the analytic count (matmuls only)
# sits ~1% below it for dense mixers. The local reference kernel computes the
# full masked score matrix (3% more than the window's pairs at this size),
# and XLA counts the selective scan's loop body once.
XLA_RTOL = {"local": 0.05, "mamba": 0.05}
XLA_RTOL_DEFAULT = 0.02


@pytest.mark.parametrize("name", sorted(DIT_PAPER_GMACS))
def test_dit_flops_match_paper(name):
  # The paper's "Gflops" are multiply-adds; flops() counts 2 per multiply-add.
  paper = 2e9 * DIT_PAPER_GMACS[name]
  assert models.flops(name, 32) == pytest.approx(paper, rel=0.01)


def test_dit_xl2_512px():
  assert models.flops("DiT-XL/2", 64) == pytest.approx(2 * 524.6e9, rel=0.01)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_analytic_matches_xla(mixer):
  kw = dict(depth=2, input_size=16, mixer=mixer,
            mixer_options=TEST_OPTIONS.get(mixer))
  ours = models.flops("DiT-S/2", **kw)
  xla = xla_flops("DiT-S/2", **kw)
  assert ours == pytest.approx(xla, rel=XLA_RTOL.get(mixer, XLA_RTOL_DEFAULT))


def test_efficient_models_cost_less_at_high_resolution():
  dit = models.flops("DiT-XL/2", 128)  # 1024px, 4096 tokens
  for name in ("DiT-XL/2-local", "DiT-XL/2-linear", "PT-DiT-XL/2",
               "DiT-XL/2-KVCompress", "DiM-XL/2"):
    assert models.flops(name, 128) < dit, name


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_named_model_is_registered_and_runs_tiny(name):
  assert name in MODELS
  _, hparams = MODELS[name]
  assert hparams["mixer"] in MIXERS
  model = models.build_model(name, **{
      **smoke_overrides(name), "hidden_size": 64, "num_heads": 4,
      "input_size": 16, "num_classes": 10})
  x = jnp.ones((1, 16, 16, 4))
  t, y = jnp.array([10.0]), jnp.array([1])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, y)  # jitted:
  out = jax.jit(model.apply)(params, x, t, y)  # eager dispatch is slower
  chex.assert_shape(out, (1, 16, 16, 8))
  chex.assert_tree_all_finite(out)


def test_kv_compress_only_in_pixart_sigmas_deep_blocks():
  # PixArt-Sigma compresses keys and values in blocks 14-27 of 28; the
  # others are plain DiT attention blocks (the same parameters as DiT-XL/2).
  def attn_params(name):
    model = models.build_model(name)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t, y = (jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32))
    blocks = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t,
                                     y))
    return [{k: v.shape for k, v in flatten_dict(
        unfreeze(blocks["params"][f"blocks_{i}"]["attn"])).items()}
            for i in range(28)]
  dit, kvc = attn_params("DiT-XL/2"), attn_params("DiT-XL/2-KVCompress")
  assert kvc[:14] == dit[:14]
  for i in range(14, 28):
    # dense attention's parameters, plus the compression's
    assert dit[i].items() < kvc[i].items(), i
  # FLOPs: 14 DiT blocks and 14 compressed ones.
  half = lambda layers: models.flops("DiT-XL/2", 128, mixer="kv_compress",
                                     mixer_options={"ratio": 2},
                                     mixer_layers=layers)
  full, dense = half(None), models.flops("DiT-XL/2", 128)
  assert models.flops("DiT-XL/2-KVCompress", 128) == pytest.approx(
      (full + dense) / 2, rel=1e-12)


def test_mixer_layers_analytic_matches_xla():
  kw = dict(depth=3, input_size=16, mixer="local", mixer_options={"window": 2},
            mixer_layers=(0, 2))
  assert models.flops("DiT-S/2", **kw) == pytest.approx(
      xla_flops("DiT-S/2", **kw), rel=XLA_RTOL["local"])
  dense = models.flops("DiT-S/2", depth=3, input_size=16)
  assert models.flops("DiT-S/2", **kw) < dense


def test_dit_sizes_follow_the_paper():
  for size, width in (("S", 384), ("B", 768), ("L", 1024), ("XL", 1152)):
    assert MODELS[f"DiT-{size}/2-local"][1]["hidden_size"] == width
    assert MODELS[f"DiM-{size}/2"][1]["hidden_size"] == width


def test_flops_cli_prints_paper_column(capsys):
  from jdit.models.flops import main
  main(["--models", "DiT-XL/2,DiT-XL/2-local", "--input_sizes", "32,64"])
  out = capsys.readouterr().out.splitlines()
  assert "paper GFLOPs" in out[0] and "DiT-XL/2/model" in out[0]
  # model, px, tokens, analytic, XLA, paper, ours/paper, DiT-XL/2/model
  xl = out[1].split()
  assert xl[:3] == ["DiT-XL/2", "256", "256"] and xl[5] == "237.28"
  assert xl[7] == "1.00"
  assert out[2].split()[0] == "DiT-XL/2-local"
  assert out[3].split()[:3] == ["DiT-XL/2", "512", "1024"]
  assert out[3].split()[5] == "1049.20"  # the DiT paper's 524.6 Gflops


def test_flops_cli_markdown(capsys):
  from jdit.models.flops import main
  main(["--models", "DiT-S/2", "--markdown", "--baseline", "DiT-S/2"])
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("| model | px | tokens |") and out[1][:4] == "|---"
  assert out[2].split("|")[1].strip() == "DiT-S/2"


def test_flops_cli_text_tokens(capsys):
  from jdit.models.flops import main
  # The baseline gets the same text cross-attention: a model against itself
  # is 1.00 with or without it.
  main(["--models", "DiT-S/2", "--baseline", "DiT-S/2", "--text_tokens",
        "120"])
  assert capsys.readouterr().out.splitlines()[1].split()[-1] == "1.00"
  with pytest.raises(ValueError, match="text_tokens.*LaMambaDiff"):
    main(["--models", "LaMamba-Diff-S", "--text_tokens", "120"])


# Qihoo-T2X's GFLOPs (multiply-adds) of its text-to-image PT-DiTs (Fig. 2,
# Fig. 8): our class-conditional PT-DiT plus a text cross-attention to its 120
# T5 tokens must reproduce them. That pins down the proxy grid (8x8 at every
# resolution) and one projection's worth of window attention per block.
@pytest.mark.parametrize("name,size", [("PT-DiT-L/2", 32), ("PT-DiT-L/2", 128),
                                       ("PT-DiT-H/2", 64),
                                       ("PT-DiT-B/2", 128)])
def test_pt_dit_matches_qihoo_t2x_figures(name, size):
  from jdit.models.flops import (model_macs, paper_gmacs,
                                 text_cross_attention_macs)
  model = models.build_model(name, input_size=size)
  ours = model_macs(model) + text_cross_attention_macs(model, 120)
  assert ours / 1e9 == pytest.approx(paper_gmacs(name, size), rel=0.03)


def test_pt_dit_saves_only_from_4096_tokens_at_equal_width():
  # At DiT-XL/2's width PT-DiT's extra projections (cross-attention query and
  # output on every token) outweigh the attention it saves below ~1000
  # tokens; the paper's savings are at equal parameter count.
  ratio = [models.flops("DiT-XL/2", s) / models.flops("PT-DiT-XL/2", s)
           for s in (32, 64, 128)]
  assert ratio[0] < 0.85 and 0.9 < ratio[1] < 1.0 and ratio[2] > 1.3


def test_flops_module_runs_as_a_cli_without_warnings():
  import subprocess
  import sys
  run = subprocess.run([sys.executable, "-m", "jdit.models.flops", "--models",
                        "DiT-S/2"], capture_output=True, text=True, check=True,
                       timeout=300)
  assert run.stdout.splitlines()[1].split()[:3] == ["DiT-S/2", "256", "256"]
  assert "Warning" not in run.stderr, run.stderr
