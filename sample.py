"""Sample from a checkpoint: writes samples.npz (arr_0 uint8 images, arr_1
labels; the ADM evaluator's layout) and a PNG grid beside it.

    python sample.py --checkpoint runs/default [--num_samples 80]
        [--sampler ddpm|ddim|dpm++|euler|heun|sde] [--steps S]
        [--cfg_scale 1.5] [--cfg_channels 3] [--cfg_interval lo,hi]
        [--cfg_rescale 0.7] [--guide_checkpoint runs/small]
        [--apg_eta 0 [--apg_norm_threshold 15] [--apg_momentum -0.5]]
        [--shift 3.33] [--labels 1,2,3] [--seed 0] [--out samples.npz]
        [--cache_interval 3 [--cache_warmup 5] [--cache_blocks 0,14]]
        [--cache_router router.json]
        [--input_size 64 [--extrapolation ntk]]

--checkpoint takes a workdir, a checkpoint directory or one step's directory
(also those written by `python -m jdit.convert`). Sampling is split over all
devices of all hosts; images depend only on --seed and their index.
Finished chunks are kept in OUT.parts/ until the npz is written, so a run
that is interrupted (a preempted TPU) resumes when re-run with the same
arguments and gives the same file; other arguments are refused.

--guide_checkpoint (autoguidance): a smaller or less trained model of the same
data, objective and time convention guides instead of the unconditional
branch; --cfg_scale, --cfg_interval, --cfg_channels and --cfg_rescale apply to
it as they would to classifier-free guidance.

--apg_eta (adaptive projected guidance, Sadat et al. 2024) takes the
guidance update in the space of the denoised estimate and down-weights its
component along the conditional estimate, which is what oversaturates
images at high --cfg_scale; with --guide_checkpoint it projects that update.
"""
import os

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

from jdit import (checkpoint, diffusion, evaluation, feature_cache,
                  learn_cache, sampling, sharding)
from jdit.models.embed import EXTRAPOLATIONS

_CKPT = flags.DEFINE_string("checkpoint", None, "Workdir or checkpoint dir.",
                            required=True)
_N = flags.DEFINE_integer("num_samples", 0,
                          "Number of samples; 0 = 8 per class (max 1000).")
_SAMPLER = flags.DEFINE_string("sampler", "", "Sampler; '' = the default of "
                               "the checkpoint's objective.")
_STEPS = flags.DEFINE_integer("steps", 0, "Sampling steps; 0 = default.")
_CFG = flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale "
                          "(1 = off).")
_CFG_CHANNELS = flags.DEFINE_integer(
    "cfg_channels", 0, "Guide only the first k channels (official DiT: 3); "
    "0 = all channels.")
_CFG_INTERVAL = flags.DEFINE_string(
    "cfg_interval", "0,1", "Guide only for normalised time t in [lo, hi] "
    "(t = 1 is noise).")
_CFG_RESCALE = flags.DEFINE_float(
    "cfg_rescale", 0.0, "CFG-rescale weight in [0, 1]: scale the guided "
    "output to the conditional output's standard deviation; 0 = off.")
_APG_ETA = flags.DEFINE_float(
    "apg_eta", None, "Adaptive projected guidance: the weight of the "
    "guidance update's component along the conditional denoised estimate "
    "(the paper: 0); unset = plain CFG.")
_APG_NORM = flags.DEFINE_float(
    "apg_norm_threshold", 0.0, "APG: clip the denoised-space update to this "
    "L2 norm per image; 0 = off.")
_APG_MOMENTUM = flags.DEFINE_float(
    "apg_momentum", 0.0, "APG: average the update over evaluations, d + "
    "momentum * previous (the paper: negative, e.g. -0.5); 0 = off.")
_GUIDE = flags.DEFINE_string(
    "guide_checkpoint", "", "Autoguidance: a checkpoint of a smaller or less "
    "trained model (an early step, a short post-hoc EMA) whose conditional "
    "output replaces the unconditional one, weighed by --cfg_scale; '' = "
    "classifier-free guidance.")
_SHIFT = flags.DEFINE_float(
    "shift", 0.0, "Flow checkpoints: warp the sampler's time grid, u -> "
    "s u / (1 + (s - 1) u) with u = 1 the noise end (s > 1 spends more steps "
    "near noise; config.diffusion.flow.sample_shift); 0 = the checkpoint's.")
_LABELS = flags.DEFINE_string("labels", "", "Comma-separated class labels, "
                              "cycled; '' = classes in order.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed; sample i uses (seed, i).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per jitted chunk; "
                              "0 = 64 rounded up to the device count.")
_OUT = flags.DEFINE_string("out", "samples.npz", "Output .npz path.")
_CACHE_INTERVAL = flags.DEFINE_integer(
    "cache_interval", 1, "Feature caching (FORA): recompute the residual "
    "blocks every N network evaluations and reuse their cached updates in "
    "between; 1 = off.")
_CACHE_WARMUP = flags.DEFINE_integer(
    "cache_warmup", 0, "Feature caching: evaluations computed in full "
    "before reuse starts.")
_CACHE_BLOCKS = flags.DEFINE_string(
    "cache_blocks", "", "Feature caching: 'first,stop', the blocks that may "
    "reuse updates; '' = all.")
_CACHE_ROUTER = flags.DEFINE_string(
    "cache_router", "", "Feature caching by a learned schedule: the router "
    "file of `python -m jdit.learn_cache` (for this sampler and step count); "
    "replaces --cache_interval/warmup/blocks.")
_INPUT_SIZE = flags.DEFINE_string(
    "input_size", "", "Sample at another resolution: the model input's side "
    "or 'rows,cols' (latent models: in latents, the image size / 8 with the "
    "SD-VAE); '' = the trained size. DiT-family models only.")
_EXTRAPOLATION = flags.DEFINE_enum(
    "extrapolation", "extrapolate", list(EXTRAPOLATIONS),
    "With --input_size larger than the trained size: how positions extend "
    "past the trained grid (jdit.models.embed.EXTRAPOLATIONS).")


def parse_interval(text: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError as e:
    raise app.UsageError(f"--cfg_interval must be 'lo,hi', got {text!r}"
                         ) from e
  return lo, hi


def parse_cache(objective) -> feature_cache.FeatureCache | None:
  if _CACHE_ROUTER.value:
    if (_CACHE_INTERVAL.value, _CACHE_WARMUP.value, _CACHE_BLOCKS.value) != (
        1, 0, ""):
      raise app.UsageError("--cache_router replaces --cache_interval, "
                           "--cache_warmup and --cache_blocks")
    sampler, steps, _ = objective.check_sampler(_SAMPLER.value or None,
                                                _STEPS.value or None, {})
    try:
      cache = learn_cache.load_router(_CACHE_ROUTER.value, sampler, steps)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    return cache if cache.active else None
  blocks = None
  if _CACHE_BLOCKS.value:
    try:
      blocks = tuple(int(v) for v in _CACHE_BLOCKS.value.split(","))
    except ValueError as e:
      raise app.UsageError(f"--cache_blocks must be 'first,stop', got "
                           f"{_CACHE_BLOCKS.value!r}") from e
  try:
    cache = feature_cache.FeatureCache(_CACHE_INTERVAL.value,
                                       warmup=_CACHE_WARMUP.value,
                                       blocks=blocks)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return cache if cache.active else None


def resize(config):
  """config with the model at --input_size (positions per --extrapolation)."""
  if not _INPUT_SIZE.value:
    if _EXTRAPOLATION.value != "extrapolate":
      raise app.UsageError("--extrapolation applies with --input_size")
    return config
  try:
    size = tuple(int(v) for v in _INPUT_SIZE.value.split(","))
  except ValueError as e:
    raise app.UsageError(f"--input_size must be a side or 'rows,cols', got "
                         f"{_INPUT_SIZE.value!r}") from e
  if len(size) not in (1, 2) or min(size) < 1:
    raise app.UsageError(f"--input_size must be a side or 'rows,cols', got "
                         f"{_INPUT_SIZE.value!r}")
  trained, _ = sampling.model_from_config(config)
  if "base_grid" not in trained.__dataclass_fields__:
    raise app.UsageError(f"--input_size: {type(trained).__name__} models "
                         f"sample at their trained size only")
  model = config.model.to_dict()  # input_size may change type (side, pair)
  model["input_size"] = size[0] if len(size) == 1 else size
  if model.get("base_grid") is None:  # the grid it was trained on
    model["base_grid"] = tuple(trained.grid_shape)
  model["extrapolation"] = _EXTRAPOLATION.value
  with config.unlocked():
    config.model = ml_collections.ConfigDict(model)
  try:
    sampling.model_from_config(config)
  except ValueError as e:
    raise app.UsageError(f"--input_size {_INPUT_SIZE.value}: {e}") from e
  return config


def identity() -> dict:
  """What determines the samples, for resuming an interrupted run: every
  flag but --out, with the checkpoints' resolved steps."""
  found = {f.name: f.value for f in globals().values()
           if isinstance(f, flags.FlagHolder) and f.name != "out"}
  for name in ("checkpoint", "guide_checkpoint"):
    if found.get(name):
      directory, step = checkpoint.resolve_step(found[name])
      found[name] = f"{directory}@{step}"
  return found


def load_guide(config, model, replicated):
  """--guide_checkpoint as (model, params) on the devices, or None."""
  if not _GUIDE.value:
    return None
  if _CFG.value == 1.0:
    raise app.UsageError("--guide_checkpoint guides with weight --cfg_scale, "
                         "which is 1 (off); set it, e.g. --cfg_scale 2")
  params, guide_config = checkpoint.load_for_sampling(_GUIDE.value)
  guide_model, _ = sampling.model_from_config(resize(guide_config))
  try:
    sampling.check_guide(config, model, guide_config, guide_model)
  except ValueError as e:
    raise app.UsageError(f"--guide_checkpoint {_GUIDE.value}: {e}") from e
  return guide_model, jax.device_put(params, replicated)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # orbax and tfds log every save/restore at INFO; keep the console readable.
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  sharding.maybe_initialize_distributed()
  params, config = checkpoint.load_for_sampling(_CKPT.value)
  if _SHIFT.value:
    if config.objective != "flow":
      raise app.UsageError(f"--shift applies to flow checkpoints; this one's "
                           f"objective is {config.objective!r}")
    config.diffusion.flow.sample_shift = _SHIFT.value
  model, objective = sampling.model_from_config(resize(config))
  cache = parse_cache(objective)
  k = model.num_classes
  if _LABELS.value:
    base = np.array([int(v) for v in _LABELS.value.split(",")])
  else:
    base = np.arange(k)
  n = _N.value or min(8 * k, 1000)
  labels = evaluation.cycled_labels(base, n, k)
  try:
    guidance = diffusion.Guidance(
        scale=_CFG.value, null_label=k, channels=_CFG_CHANNELS.value or None,
        interval=parse_interval(_CFG_INTERVAL.value),
        rescale=_CFG_RESCALE.value, apg_eta=_APG_ETA.value,
        apg_norm_threshold=_APG_NORM.value, apg_momentum=_APG_MOMENTUM.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  mesh = sharding.create_mesh({"data": -1})
  replicated = sharding.NamedSharding(mesh, sharding.P())
  params = jax.device_put(params, replicated)
  guide = load_guide(config, model, replicated)
  decode = evaluation.latent_decoder(config)  # None for pixel models
  try:
    sampler = sampling.Sampler(model, objective, params, mesh=mesh,
                               sampler=_SAMPLER.value or None,
                               steps=_STEPS.value or None, guidance=guidance,
                               decode=decode, cache=cache, guide=guide)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  par = sharding.batch_parallelism(mesh)
  chunk = _BATCH.value or -(-min(64, n) // par) * par
  logging.info("sampling %d images with %s, %d steps", n, sampler.sampler,
               sampler.steps)
  out = os.path.abspath(_OUT.value)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(out), exist_ok=True)
  try:
    head = sampling.generate_to_file(sampler, labels, out, seed=_SEED.value,
                                     chunk=chunk, identity=identity(),
                                     preview=min(n, 100))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if jax.process_index() == 0:
    grid = os.path.splitext(out)[0] + ".png"
    sampling.save_grid(head, grid, ncol=min(10, int(np.ceil(np.sqrt(len(
        head))))))
    print(f"wrote {out} ({n} samples) and {grid}")


if __name__ == "__main__":
  app.run(main)
