"""Flax FID Inception vs an independent PyTorch one (and pytorch-fid)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import convert
from jdit.metrics import inception

torch = pytest.importorskip("torch")
F = torch.nn.functional

# pylint: disable-next=g-import-not-at-top,wrong-import-position
import inception_torch_ref

# float32 through ~48 layers with O(1) activations; relative to the scale.
RTOL = 2e-4


@pytest.fixture(scope="module")
def nets():
  model_t = inception_torch_ref.random_fid_inception()
  params = inception.inception_params_from_torch(model_t.state_dict())
  return model_t, params


@functools.lru_cache(maxsize=None)
def _net_fn():
  net = inception.InceptionV3()
  return jax.jit(lambda p, x: net.apply({"params": p}, x))


def _close(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  scale = np.abs(b).max()
  assert scale > 1e-2, f"{what} is degenerate"
  np.testing.assert_allclose(a, b, atol=RTOL * scale, rtol=0, err_msg=what)


def test_network_matches_torch(nets):
  model_t, params = nets
  # 107 px exercises every block (and odd border sizes) at a fraction of the
  # cost of 299; the network is fully convolutional up to the pool.
  x = np.random.RandomState(0).uniform(-1, 1, (2, 107, 107, 3)).astype(
      np.float32)
  out = _net_fn()(params, jnp.asarray(x))
  with torch.no_grad():
    pool, spatial, logits = model_t(torch.from_numpy(
        x.transpose(0, 3, 1, 2).copy()))
  _close(out["pool"], pool.numpy(), "pool")
  _close(out["logits"], logits.numpy(), "logits")
  # Spatial: first 7 channels of Mixed_6d.branch1x1, flattened (H, W, C).
  sp = spatial.numpy()[:, :7].transpose(0, 2, 3, 1).reshape(2, -1)
  _close(out["spatial"], sp, "spatial")
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)


def test_feature_sizes_at_299(nets):
  _, params = nets
  shapes = jax.eval_shape(
      lambda p, x: inception.InceptionV3().apply({"params": p}, x), params,
      jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  assert shapes["spatial"].shape == (1, 7 * 17 * 17)  # ADM's 2023 dims
  assert shapes["pool"].shape == (1, 2048)


def _tf_legacy_resize(img, size):
  """Loop reference of TF1 ResizeBilinear(align_corners=False)."""
  h, w, _ = img.shape
  out = np.zeros((size, size, img.shape[2]), np.float64)
  for i in range(size):
    y = i * h / size
    y0 = int(np.floor(y))
    y1, fy = min(y0 + 1, h - 1), y - y0
    for j in range(size):
      x = j * w / size
      x0 = int(np.floor(x))
      x1, fx = min(x0 + 1, w - 1), x - x0
      top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
      bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
      out[i, j] = top * (1 - fy) + bot * fy
  return out


@pytest.mark.parametrize("hw", [(32, 40), (40, 13)])
def test_preprocess_modes(hw):
  rng = np.random.RandomState(1)
  img = rng.randint(0, 256, (1,) + hw + (3,)).astype(np.uint8)
  size = 37  # small output; the formulas do not depend on it
  ours = np.asarray(inception.preprocess(jnp.asarray(img), "pytorch_fid",
                                         size))
  ref = F.interpolate(torch.from_numpy(img.transpose(0, 3, 1, 2) / 255.0),
                      size=(size, size), mode="bilinear",
                      align_corners=False).numpy() * 2 - 1
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-5)
  ours = np.asarray(inception.preprocess(jnp.asarray(img), "adm", size))
  ref = (_tf_legacy_resize(img[0].astype(np.float64), size) - 128) / 128
  np.testing.assert_allclose(ours[0], ref, atol=1e-5)
  same = np.asarray(inception.preprocess(jnp.asarray(img), "adm", hw[0]))
  if hw[0] == hw[1]:
    np.testing.assert_allclose(same, (img - 128.0) / 128.0)


def test_converter_errors(nets):
  model_t, _ = nets
  sd = dict(model_t.state_dict())
  sd["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head
  del sd["Mixed_7c.branch_pool.bn.running_var"]
  sd["AuxLogits.fc.weight"] = torch.zeros(1)  # ignored
  with pytest.raises(convert.CheckpointMismatchError) as e:
    inception.inception_params_from_torch(sd)
  msg = str(e.value)
  assert "missing keys (1): Mixed_7c.branch_pool.bn.running_var" in msg
  assert "fc.weight: checkpoint (1000, 2048), expected (1008, 2048)" in msg
  assert "unexpected" not in msg


def test_pytorch_fid_parity(nets):
  """pytorch-fid itself, where it and torchvision are installed."""
  pytest.importorskip("torchvision")
  fid_inception = pytest.importorskip("pytorch_fid.inception")
  model_t, params = nets
  # pylint: disable-next=protected-access
  tv = fid_inception._inception_v3(num_classes=1008, aux_logits=False,
                                   weights=None)
  for name, c in (("Mixed_5b", (192, 32)), ("Mixed_5c", (256, 64)),
                  ("Mixed_5d", (288, 64))):
    setattr(tv, name, fid_inception.FIDInceptionA(*c))
  for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                  ("Mixed_6e", 192)):
    setattr(tv, name, fid_inception.FIDInceptionC(768, channels_7x7=c))
  tv.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  tv.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  tv.load_state_dict(model_t.state_dict())
  tv.eval()
  x = np.random.RandomState(2).uniform(-1, 1, (1, 107, 107, 3)).astype(
      np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
      xt = getattr(tv, name)(xt)
    xt = F.max_pool2d(xt, 3, 2)
    xt = F.max_pool2d(tv.Conv2d_4a_3x3(tv.Conv2d_3b_1x1(xt)), 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c"):
      xt = getattr(tv, name)(xt)
    pool = xt.mean(dim=(2, 3)).numpy()
  out = _net_fn()(params, jnp.asarray(x))
  _close(out["pool"], pool, "pool vs pytorch-fid")
