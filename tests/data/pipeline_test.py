"""The input pipeline: deterministic, resumable, split over hosts."""
import numpy as np
import pytest

from jdit import data


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return data.load_source("digits", data_dir=str(
      tmp_path_factory.mktemp("tfds")))


def pipe(source, **kw):
  args = dict(global_batch_size=32, seed=0)
  args.update(kw)
  return data.InputPipeline(source, data.get_spec("digits"), **args)


def test_digits_dataset(source):
  assert len(source) == 1797
  ex = source[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  labels = np.array([source[i]["label"] for i in range(len(source))])
  assert set(labels.tolist()) == set(range(10))
  from sklearn.datasets import load_digits
  assert np.bincount(labels).tolist() == np.bincount(
      load_digits().target).tolist()


def test_batches_are_a_function_of_seed_and_step(source):
  a, b = pipe(source), pipe(source)
  for step in (0, 5, 3):
    np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
  c = pipe(source, seed=1)
  assert not np.array_equal(a.batch(0)["y"], c.batch(0)["y"])
  x = a.batch(0)["x"]
  assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1


def test_every_example_once_per_epoch(source):
  p = pipe(source, global_batch_size=1797 // 3)
  seen = np.concatenate([p.indices(s) for s in range(3)])
  assert sorted(seen.tolist()) == list(range(1797))


def test_hosts_read_disjoint_slices_of_the_global_batch(source):
  whole = pipe(source).indices(7)
  parts = [pipe(source, process_index=i, process_count=4).indices(7)
           for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_flips_are_deterministic(source):
  a = pipe(source, flip=True).batch(2)["x"]
  b = pipe(source, flip=True).batch(2)["x"]
  plain = pipe(source).batch(2)["x"]
  np.testing.assert_array_equal(a, b)
  flipped = [i for i in range(32) if not np.array_equal(a[i], plain[i])]
  assert flipped
  for i in flipped:
    np.testing.assert_array_equal(a[i], plain[i][:, ::-1])


def test_bad_input(source):
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    data.get_spec("mnist")
  with pytest.raises(ValueError, match="divisible by the number of hosts"):
    pipe(source, global_batch_size=30, process_count=4)
