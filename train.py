"""Train a diffusion transformer: `python train.py` trains the digits default.

    python train.py [--config configs/X.py[:arg]] [--config.key=value ...]
                    [--workdir runs/default]

Re-running with the same --workdir resumes from its newest checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

import jdit.train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Training config (a Python file).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Checkpoints, metrics and samples go here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # orbax and tfds log every save/restore at INFO; keep the console readable.
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  jdit.train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
