"""FID (and Inception Score, and FD_DINOv2) of EMA samples during training.

Configured by `config.eval` (see configs/default.py); off when `every` is 0.
Every `every` steps and at the last step, the trainer calls an `Evaluator`
with the EMA params: it samples `num_samples` images exactly as sample.py
does (labels cycle through the classes, image i depends only on the seed and
i for a fixed `batch_size`, not on the number of devices), decodes latents
through config.vae, computes Inception-v3 pool features and logits sharded
over the mesh, and scores them against an ADM reference batch's mu/sigma.
The seed is the same at every evaluation, so successive FIDs differ by the
model only, not by the noise.

Everything that can be wrong with the config (paths, sizes, the reference's
feature size, the Inception weights) is checked when the Evaluator is built,
before the trainer does any training compute.
"""
from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from jdit import diffusion, sampling, sharding
from jdit.metrics import fid, inception, scores

POOL_FEATURES = 2048  # InceptionV3's pool_3 width, the size of mu and sigma
FID_METHOD = "eigh"   # same value as ADM's sqrtm to ~1e-6, ~20x faster
IS_SPLITS = 10        # ADM: 10 splits of the samples


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("eval")) and config.eval.get("every", 0) > 0


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks config.eval's fields (cheap: no file is read)."""
  if not config.get("eval"):
    return
  e = config.eval
  every = e.get("every", 0)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f"config.eval.every must be an integer >= 0 (0 = no "
                     f"evaluation), got {every!r}")
  if not every:
    return
  for key in ("num_samples", "batch_size"):
    if key not in e:
      raise ValueError(f"config.eval.{key} is missing; see "
                       f"configs/default.py")
  if not isinstance(e.num_samples, int) or e.num_samples < 2:
    raise ValueError(f"config.eval.num_samples must be an integer >= 2 (FID "
                     f"needs a covariance), got {e.num_samples!r}")
  if not isinstance(e.batch_size, int) or e.batch_size < 1:
    raise ValueError(f"config.eval.batch_size must be a positive integer, "
                     f"got {e.batch_size!r}")
  what = {"ref": "an ADM reference batch .npz with mu and sigma (e.g. "
                 "VIRTUAL_imagenet256_labeled.npz)",
          "inception": "the local pt_inception-2015-12-05-6726825d.pth"}
  for key, expected in what.items():
    path = e.get(key) or ""
    if not path:
      raise ValueError(f"config.eval.every={every} but config.eval.{key} is "
                       f"empty; set it to {expected}")
    if not os.path.isfile(os.path.expanduser(path)):
      raise ValueError(f"config.eval.{key}={path!r} does not exist; expected "
                       f"{expected}")
  dinov2 = e.get("dinov2") or ""
  if dinov2 and not os.path.isfile(os.path.expanduser(dinov2)):
    raise ValueError(f"config.eval.dinov2={dinov2!r} does not exist; "
                     f"expected torch.hub's dinov2_vitl14_pretrain.pth")


def latent_decoder(config: ml_collections.ConfigDict):
  """latents -> [-1, 1] images with config.vae (None for pixel models).

  Shared by sample.py and the evaluator: the dataset's normalisation is
  undone (divided by the VAE's scale factor and, for VAEs with per-channel
  statistics such as VA-VAE, de-standardised) and the latents decoded.
  """
  if not (config.get("vae") and config.vae.get("path")):
    return None
  from jdit import vae as vae_lib  # pylint: disable=g-import-not-at-top
  vae_model, vae_params, _ = vae_lib.load_vae(config.vae.path)
  return lambda z: vae_model.apply({"params": vae_params}, z,
                                   method="decode_latents")


def cycled_labels(base: np.ndarray, n: int, num_classes: int) -> np.ndarray:
  """n labels repeating `base` (sample.py's and FID sampling's labels)."""
  return sampling.check_labels(np.resize(np.asarray(base), n), num_classes)


def load_reference(path: str, keys=("mu", "sigma"), d: int = POOL_FEATURES,
                   what: str = "Inception pool features"
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The statistics `keys` of an ADM reference batch, checked against the
  feature size `d` (Inception's, or DINOv2's with mu_dinov2/sigma_dinov2)."""
  try:
    ref = np.load(os.path.expanduser(path))
    present = set(ref.files)
  except Exception as e:  # not an .npz: numpy raises several types
    raise ValueError(f"config.eval.ref={path!r} is not a readable .npz: "
                     f"{e}") from e
  if not set(keys) <= present:
    dinov2 = " --dinov2 ..." if "dinov2" in keys[0] else ""
    raise ValueError(
        f"config.eval.ref={path!r} has no {'/'.join(keys)} statistics (it "
        f"has {sorted(present)}); write them from real images with `python "
        f"-m jdit.metrics.fid --samples IMAGES.npz --write_ref OUT.npz "
        f"--inception ...{dinov2}`")
  mu, sigma = (np.asarray(ref[k], np.float64) for k in keys)
  if mu.shape != (d,) or sigma.shape != (d, d):
    raise ValueError(
        f"config.eval.ref={path!r} has statistics {keys[0]} {mu.shape}, "
        f"{keys[1]} {sigma.shape}; {what} need ({d},), ({d}, {d})")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"config.eval.ref={path!r}: {keys[0]} or {keys[1]} is "
                     f"not finite")
  return mu, sigma


def frechet_distance_to(features: np.ndarray, ref_mu: np.ndarray,
                        ref_sigma: np.ndarray) -> float:
  """FID of (N, D) features against reference statistics.

  With fewer samples than dimensions (FID-1K, tests) the sample covariance
  X^T X has rank < N, and tr (X^T X S)^(1/2) is the trace of the root of
  the small N x N matrix X S X^T (same nonzero eigenvalues): exact, and
  much cheaper than the D x D eigendecompositions.
  """
  n, d = features.shape
  if n > d:
    mu, sigma = scores.statistics(features)
    return scores.frechet_distance(mu, sigma, ref_mu, ref_sigma,
                                   method=FID_METHOD)
  x = np.asarray(features, np.float64)
  mu = x.mean(axis=0)
  xc = (x - mu) / np.sqrt(n - 1)  # sigma = xc.T @ xc, as np.cov
  small = xc @ ref_sigma @ xc.T
  ev = np.linalg.eigvalsh((small + small.T) / 2)
  if not np.all(np.isfinite(ev)):
    raise scores.FIDError("FID: eigenvalues of the covariance product are "
                          "not finite")
  diff = mu - ref_mu
  return float(diff @ diff + np.sum(xc * xc) + np.trace(ref_sigma)
               - 2.0 * np.sum(np.sqrt(np.clip(ev, 0, None))))


class Evaluator:
  """FID/IS of a model's samples against config.eval.ref.

  Built once before training (loading and checking everything it needs);
  called with the EMA params, returns {"eval/fid", "eval/inception_score",
  "eval/seconds"} and, with config.eval.dinov2, "eval/fd_dinov2".
  """

  def __init__(self, config: ml_collections.ConfigDict, model, objective,
               mesh):
    validate_config(config)
    e, s = config.eval, config.get("sample", ml_collections.ConfigDict())
    self.every, self.total_steps = e.every, config.total_steps
    self.num_samples, self.batch_size = e.num_samples, e.batch_size
    self.seed = config.seed
    self.model, self.objective, self.mesh = model, objective, mesh
    par = sharding.batch_parallelism(mesh)
    if self.batch_size % par:  # a fixed chunk keeps the noise mesh-free
      raise ValueError(f"config.eval.batch_size={self.batch_size} must be "
                       f"divisible by the {par} devices of the batch axes "
                       f"{sharding.BATCH_AXES} of mesh {dict(mesh.shape)}")
    # "" / 0 / None take the sample section's values (then the objective's).
    self.sampler_name = e.get("sampler") or s.get("sampler") or None
    self.steps = e.get("steps") or s.get("steps") or None
    cfg = e.get("cfg_scale")
    self.cfg_scale = float(s.get("cfg_scale", 1.0) if cfg is None else cfg)
    try:
      objective.check_sampler(self.sampler_name, self.steps, {})
    except ValueError as err:
      raise ValueError(f"config.eval.sampler/steps (or config.sample's): "
                       f"{err}") from err
    try:
      sampling.check_cfg(model, self.cfg_scale)
    except ValueError as err:
      raise ValueError(f"config.eval.cfg_scale={self.cfg_scale} (or "
                       f"config.sample's): {err}") from err
    self.decode = latent_decoder(config)
    channels = 3 if self.decode else model.input_shape[-1]
    if channels not in (1, 3):
      raise ValueError(
          f"config.eval needs images: the model samples {channels}-channel "
          f"latents; set config.vae.path to the VAE that decodes them")
    self.ref_mu, self.ref_sigma = load_reference(e.ref)
    try:
      params = inception.load_inception(os.path.expanduser(e.inception))
    except Exception as err:  # torch/pickle/key mismatches: many types
      raise ValueError(f"config.eval.inception={e.inception!r} is not the "
                       f"FID Inception-v3 weights file: {err}") from err
    self.inception = fid.InceptionFeatures(params, self.batch_size,
                                           mesh=mesh)
    self.dinov2 = None
    if e.get("dinov2"):
      from jdit import convert_dinov2  # pylint: disable=g-import-not-at-top
      try:
        encoder = convert_dinov2.load_dinov2(os.path.expanduser(e.dinov2))
      except Exception as err:  # torch/pickle/key mismatches: many types
        raise ValueError(f"config.eval.dinov2={e.dinov2!r} is not a DINOv2 "
                         f"checkpoint: {err}") from err
      self.ref_dinov2 = load_reference(
          e.ref, ("mu_dinov2", "sigma_dinov2"), encoder[0].hidden_size,
          "DINOv2 class tokens")
      self.dinov2 = fid.DINOv2Features(*encoder, batch_size=self.batch_size,
                                       mesh=mesh)
    self.labels = cycled_labels(np.arange(model.num_classes),
                                self.num_samples, model.num_classes)
    self._sampler = None

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total_steps

  def image_batches(self, params):
    """uint8 (chunk, H, W, C) batches of the samples of `params`, as
    sample.py's, made one at a time as they are consumed."""
    if self._sampler is None:
      guidance = diffusion.Guidance(scale=self.cfg_scale,
                                    null_label=self.model.num_classes)
      self._sampler = sampling.Sampler(
          self.model, self.objective, params, mesh=self.mesh,
          sampler=self.sampler_name, steps=self.steps, guidance=guidance,
          decode=self.decode)
    # The jitted sampler takes params as an argument: new EMA params reuse
    # the compiled program.
    self._sampler.params = params
    return sampling.generate_batches(self._sampler, self.labels,
                                     seed=self.seed, chunk=self.batch_size)

  def images(self, params) -> np.ndarray:
    """All samples of `params` at once: uint8 (num_samples, H, W, C)."""
    return np.concatenate(list(self.image_batches(params)))

  def metrics(self, batches) -> dict[str, float]:
    """FID and IS of uint8 image batches (any iterable of arrays).

    Only Inception features are kept, 2048 + 1008 floats an image: FID-50K
    of 256px samples holds 0.6 GB on the host, not the 9.8 GB of the images.
    """
    rgb = (np.repeat(b, 3, axis=-1) if b.shape[-1] == 1 else b
           for b in batches)  # grayscale (digits): the networks want RGB
    networks = [self.inception] + ([self.dinov2] if self.dinov2 is not None
                                   else [])
    feats = fid.extract(rgb, networks, keys=("pool", "logits", "dinov2"))
    result = {
        "eval/fid": frechet_distance_to(feats["pool"], self.ref_mu,
                                        self.ref_sigma),
        "eval/inception_score": scores.inception_score(
            feats["logits"], min(IS_SPLITS, len(feats["logits"])))}
    if self.dinov2 is not None:
      result["eval/fd_dinov2"] = frechet_distance_to(feats["dinov2"],
                                                     *self.ref_dinov2)
    return result

  def __call__(self, params) -> dict[str, float]:
    start = time.time()
    result = self.metrics(self.image_batches(params))
    result["eval/seconds"] = time.time() - start
    return result
