"""Resumable writing of jdit.data.extract_latents' host-local shards.

Encoding ImageNet takes hours, on machines that get preempted. Each host
writes its examples, in order, into ArrayRecord shards of a fixed number of
examples; after a shard is closed, `host<h>.progress.json` records the
lengths and the moment sums of every closed shard. A re-run with the same
settings finds that file, removes the shard it was writing when it stopped
(an ArrayRecord file is unreadable until closed) and continues after the
last closed one, so the dataset and its statistics come out as an
uninterrupted run's. `host<h>.json` marks a host's part of a dataset done.

The settings of a run are fingerprinted in `extract.json` at the top of the
work directory (`--out.tmp`): a re-run whose settings differ is refused,
naming them, rather than mixing two extractions or silently discarding the
first (pass --restart to discard it).
"""
from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module

RUN_FILE = "extract.json"  # the settings' fingerprint


def _write_json(path: str, value) -> None:
  """Writes atomically: a crash leaves the old file or the new, never half."""
  with open(path + ".part", "w") as fh:
    json.dump(value, fh, indent=1)
  os.replace(path + ".part", path)


def read_json(path: str):
  with open(path) as fh:
    return json.load(fh)


def progress_path(directory: str, host: int) -> str:
  return os.path.join(directory, f"host{host:05d}.progress.json")


def done_path(directory: str, host: int) -> str:
  return os.path.join(directory, f"host{host:05d}.json")


def shard_path(directory: str, host: int, index: int) -> str:
  return os.path.join(directory, f"host{host:05d}-{index:05d}")


def check_run(tmp: str, fingerprint: dict, restart: bool) -> str:
  """'resume' when `tmp` holds an unfinished run of the same settings,
  'fresh' when there is nothing to continue (or `restart`). Reads only:
  every host may call it."""
  path = os.path.join(tmp, RUN_FILE)
  if restart or not os.path.exists(tmp):
    return "fresh"
  if not os.path.exists(path):  # created but never fingerprinted: empty
    return "fresh"
  run = read_json(path)
  diff = sorted(k for k in set(run["settings"]) | set(fingerprint)
                if run["settings"].get(k) != fingerprint.get(k))
  if diff:
    changes = ", ".join(f"{k}: {run['settings'].get(k)!r} then, "
                        f"{fingerprint.get(k)!r} now" for k in diff)
    raise ValueError(
        f"{tmp} holds an unfinished extraction with other settings "
        f"({changes}); re-run with its settings to resume it, or pass "
        f"--restart to discard it")
  return "resume"


def start_run(tmp: str, fingerprint: dict) -> None:
  _write_json(os.path.join(tmp, RUN_FILE), {"settings": fingerprint})


def remove_run_files(tmp: str, directories: list[str]) -> None:
  """Drops the resume state before `tmp` becomes the published dataset
  (last, and the run file last of all: a run stopped in between starts
  over, it never reads half the state)."""
  for directory in directories:
    for name in os.listdir(directory):
      if name.startswith("host") and name.endswith(".json"):
        os.remove(os.path.join(directory, name))
  os.remove(os.path.join(tmp, RUN_FILE))


class ShardWriter:
  """Serialises examples into this host's ArrayRecord shards in `directory`,
  `per_shard` examples each, checkpointing after every closed shard.

  `write(example, sums)` takes the example's (3, channels) moment sums
  (sum of mean, of mean^2, of std^2 over its positions); they are kept per
  shard, so a resumed run adds the same numbers in the same order."""

  def __init__(self, directory: str, host: int, features, per_shard: int,
               channels: int):
    self.directory, self.host = directory, host
    self.features, self.per_shard = features, per_shard
    self.lengths: list[int] = []  # of the closed shards
    self.sums: list[np.ndarray] = []  # (3, channels) float64 per shard
    self._open_sums = np.zeros((3, channels), np.float64)
    self._count = 0  # examples in the open shard
    self._writer = None
    path = progress_path(directory, host)
    if os.path.exists(path):
      done = read_json(path)
      self.lengths = done["lengths"]
      self.sums = [np.asarray(s, np.float64) for s in done["sums"]]
    # Whatever follows the last closed shard was cut off mid-write.
    k = len(self.lengths)
    while os.path.exists(shard_path(directory, host, k)):
      os.remove(shard_path(directory, host, k))
      k += 1

  @property
  def examples_written(self) -> int:
    """Examples in closed shards: where a resumed run continues."""
    return sum(self.lengths)

  def write(self, example: dict, sums: np.ndarray) -> None:
    if self._writer is None:
      self._writer = array_record_module.ArrayRecordWriter(
          shard_path(self.directory, self.host, len(self.lengths)),
          "group_size:1")
    self._writer.write(self.features.serialize_example(example))
    self._open_sums += sums
    self._count += 1
    if self._count == self.per_shard:
      self._close_shard()

  def _close_shard(self) -> None:
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    self.lengths.append(self._count)
    self.sums.append(self._open_sums)
    self._open_sums = np.zeros_like(self._open_sums)
    self._count = 0
    _write_json(progress_path(self.directory, self.host),
                {"lengths": self.lengths,
                 "sums": [s.tolist() for s in self.sums]})

  def close(self, **info) -> None:
    """Closes the last shard and marks this host's part done, with the
    lengths, the summed moments and `info`, for the merge on host 0."""
    self._close_shard()
    total = np.sum(self.sums, axis=0) if self.sums else self._open_sums
    _write_json(done_path(self.directory, self.host),
                {"lengths": self.lengths, "sums": total.tolist(), **info})
