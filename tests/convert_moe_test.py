"""DiT-MoE and SiT checkpoints -> jdit: parity with PyTorch, sampling configs.

The PyTorch DiT-MoE block below restates feizc/DiT-MoE's layer from its
paper and key names (a bias-free router `moe.gate.weight` over E bias-free
SwiGLU experts `moe.experts.j.{gate,up,down}_proj`, raw softmax weights of
the top k, two shared experts fused into `moe.shared_experts`), on the
DiT of tests/convert_test.py; routing is a plain loop over experts that never
drops a token, as DiT-MoE's inference (and jdit's sampling).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from convert_test import SMALL, TINY, TorchBlock, _torch_dit, _torch_out
from jdit import checkpoint, convert, convert_cli
from jdit.models import build_model
from jdit.models.moe_models import dit_moe_options

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

EXPERTS, TOP_K = 8, 2
WIDTH = SMALL["hidden_size"]
NAME = "DiT-MoE-S/2-8E2A"
MOE_OVERRIDES = dict(SMALL, input_size=8, num_classes=10,
                     mlp_options=dit_moe_options(WIDTH, EXPERTS))


class TorchSwiGLU(tnn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.gate_proj = tnn.Linear(dim, hidden, bias=False)
    self.up_proj = tnn.Linear(dim, hidden, bias=False)
    self.down_proj = tnn.Linear(hidden, dim, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TorchMoE(tnn.Module):

  def __init__(self, dim, experts, top_k):
    super().__init__()
    self.top_k = top_k
    self.gate = tnn.Module()
    self.gate.weight = tnn.Parameter(torch.empty(experts, dim))
    self.experts = tnn.ModuleList(TorchSwiGLU(dim, 4 * dim)
                                  for _ in range(experts))
    self.shared_experts = TorchSwiGLU(dim, 2 * dim)

  def forward(self, x):
    flat = x.reshape(-1, x.shape[-1])
    weights, chosen = (flat @ self.gate.weight.T).softmax(-1).topk(self.top_k)
    y = torch.zeros_like(flat)
    for j, expert in enumerate(self.experts):
      rows, slot = (chosen == j).nonzero(as_tuple=True)
      if len(rows):
        y[rows] += weights[rows, slot, None] * expert(flat[rows])
    return (y + self.shared_experts(flat)).reshape(x.shape)


class TorchMoEBlock(TorchBlock):

  def __init__(self, dim, heads):
    super().__init__(dim, heads)
    del self.mlp
    self.moe = TorchMoE(dim, EXPERTS, TOP_K)

  def feedforward(self, x):
    return self.moe(x)


def _torch_dit_moe(seed=0):
  model = _torch_dit(seed=seed)
  for i in range(len(model.blocks)):
    model.blocks[i] = TorchMoEBlock(WIDTH, SMALL["num_heads"])
  torch.manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".moe." in name:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
      elif ".blocks." in f".{name}":
        p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
  return model.eval()


def _inputs():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  t = np.array([0.0, 17.5, 999.0], np.float32)
  y = np.array([1, 10, 7])  # 10 is the null (CFG) label
  return x, t, y


@pytest.fixture(scope="module")
def moe_torch():
  return _torch_dit_moe()


def test_dit_moe_checkpoint_matches_pytorch(moe_torch):
  sd = moe_torch.state_dict()
  assert "blocks.1.moe.experts.7.down_proj.weight" in sd
  params = convert.dit_params_from_torch(sd, NAME, **MOE_OVERRIDES)
  model = build_model(NAME, **MOE_OVERRIDES)
  x, t, y = (jnp.asarray(a) for a in _inputs())
  # Sampling (train=False) drops no token, as DiT-MoE's inference.
  out = model.apply({"params": params}, x, t, y)
  ref = _torch_out(moe_torch, *_inputs())
  assert np.abs(ref).mean() > 0.1
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  # Training routing (capacity 1.25) takes some tokens' experts away here;
  # no label is dropped (force_drop_ids), so only the routing differs.
  trained = model.apply({"params": params}, x, t, y, train=True,
                        force_drop_ids=jnp.zeros(3, bool))
  assert np.abs(np.asarray(trained) - ref).max() > 1e-3


def test_dit_moe_checkpoint_errors(moe_torch):
  sd = moe_torch.state_dict()
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"missing keys.*blocks\.0\.mlp\.fc1\.weight"):
    convert.dit_params_from_torch(sd, "DiT-S/2", input_size=8,
                                  num_classes=10, **SMALL)
  gelu = dict(MOE_OVERRIDES, mlp_options=dit_moe_options(
      WIDTH, EXPERTS, expert_act="gelu"))
  with pytest.raises(ValueError, match="expert_act.*gelu"):
    convert.dit_params_from_torch(sd, NAME, **gelu)
  wrong_e = dict(MOE_OVERRIDES, mlp_options=dit_moe_options(WIDTH, 4))
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"unexpected keys.*experts\.7"):
    convert.dit_params_from_torch(sd, NAME, **wrong_e)


@pytest.mark.parametrize("objective,flip", [("sit", True), ("rf", False)])
def test_cli_writes_the_checkpoints_objective(moe_torch, tmp_path, objective,
                                              flip):
  torch.save(moe_torch.state_dict(), tmp_path / "moe.pt")
  out = tmp_path / "converted"
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "moe.pt"),
                    "--model", NAME, "--objective", objective,
                    "--override", f"mlp_options={MOE_OVERRIDES['mlp_options']}",
                    *TINY, "--out", str(out)])
  params, config = checkpoint.load_for_sampling(str(out))
  assert config.objective == "flow"
  flow = config.diffusion.flow
  assert (flow.path, flow.prediction, flow.model_time_flip,
          flow.model_time_scale) == ("linear", "velocity", flip, 1.0)
  # The model sample.py builds is the PyTorch model.
  from jdit.sampling import model_from_config
  model, _ = model_from_config(config)
  x, t, y = _inputs()
  t = t / 1000.0  # these objectives feed the network t in [0, 1]
  out_ = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                     jnp.asarray(y))
  np.testing.assert_allclose(out_, _torch_out(moe_torch, x, t, y), atol=1e-4,
                             rtol=1e-4)


def test_cli_default_objective_is_ddpm(tmp_path):
  torch.save(_torch_dit().state_dict(), tmp_path / "dit.pt")
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "dit.pt"),
                    "--model", "DiT-S/2", *TINY, "--out",
                    str(tmp_path / "o")])
  _, config = checkpoint.load_for_sampling(str(tmp_path / "o"))
  assert config.objective == "ddpm"
  assert not config.diffusion.flow.model_time_flip
