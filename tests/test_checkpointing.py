"""Tests of skipganomaly_jax.training.checkpointing (Orbax wrapper) on a tiny flax model."""

import glob
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from skipganomaly_jax.training.checkpointing import Checkpointer, CheckpointError

# After a failed restore (the corrupt-checkpoint tests), TensorStore may still call back
# into Orbax's already closed asyncio loop from another thread ("Event loop is closed"):
# harmless noise from inside Orbax, reported by pytest on whichever test runs next.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


class TrainState(train_state.TrainState):
  batch_stats: dict


def make_state(in_features: int = 4, seed: int = 0) -> dict:
  """A run's state: a TrainState with batch_stats and adam, plus PRNG keys."""
  model = nn.Dense(3)
  params = model.init(jax.random.key(seed), jnp.ones((1, in_features)))['params']
  state = TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optax.adam(1e-2),
    batch_stats={'mean': jnp.zeros(3), 'var': jnp.ones(3)},
  )
  return {
    'generator': state,
    'rng': jax.random.key_data(jax.random.key(seed + 1)),
    'typed_rng': jax.random.key(seed + 2),
  }


def trained_state(seed: int = 0) -> dict:
  """`make_state` after one optimiser step, so that no leaf is at its initial value."""
  tree = make_state(seed=seed)
  state = tree['generator']
  grads = jax.tree.map(jnp.ones_like, state.params)
  state = state.apply_gradients(
    grads=grads, batch_stats={'mean': jnp.arange(3.0), 'var': 2 * jnp.ones(3)}
  )
  return {**tree, 'generator': state}


def abstract_state(in_features: int = 4):
  return jax.eval_shape(lambda: make_state(in_features))


def assert_trees_equal(a, b):
  """Same key paths and leaf values (static fields such as apply_fn are not compared)."""
  leaves_a, leaves_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
    if jax.dtypes.issubdtype(getattr(x, 'dtype', np.float32), jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


META = {'config': {'isize': 32, 'lr': 2e-4, 'name': 'mnist'}, 'calibration': {'threshold': 0.5}}


def test_round_trip_and_reopen(tmp_path):
  saved = trained_state()
  with Checkpointer(tmp_path / 'ckpt') as ckpt:
    ckpt.save(10, saved, META, metrics={'val_score': np.float32(0.25)})
    ckpt.wait()
    state, meta = ckpt.restore(None, abstract_state())
  assert meta == META
  assert type(state['generator']) is TrainState
  assert type(state['generator'].opt_state[0]) is optax.ScaleByAdamState
  assert_trees_equal(state, saved)
  # A fresh Checkpointer on the same directory, with a concrete target.
  with Checkpointer(tmp_path / 'ckpt') as ckpt:
    assert ckpt.latest_step() == 10 and ckpt.best_step() == 10
    assert ckpt.restore_meta() == META
    state, _ = ckpt.restore(10, make_state(seed=5))
    assert_trees_equal(state, saved)
    # The restored state trains on.
    grads = jax.tree.map(jnp.ones_like, state['generator'].params)
    assert int(state['generator'].apply_gradients(grads=grads).step) == 2


def test_latest_kept_when_best_is_older(tmp_path):
  tree = make_state()
  ckpt = Checkpointer(tmp_path, keep_latest=1, keep_best=1)
  for step, score in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]:
    ckpt.save(step, tree, {'step': step}, metrics={'val_score': score})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 4]
  assert ckpt.best_step() == 1 and ckpt.latest_step() == 4
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ['1', '4']
  # Reopened: same policy, metrics of old steps read back from disk.
  ckpt = Checkpointer(tmp_path, keep_latest=1, keep_best=1)
  assert ckpt.best_step() == 1 and ckpt.latest_step() == 4
  ckpt.save(5, tree, {'step': 5}, metrics={'val_score': 0.5})
  ckpt.save(6, tree, {'step': 6})  # No metrics: kept as latest only.
  ckpt.wait()
  assert ckpt.all_steps() == [1, 5, 6]  # 5: the latest step with metrics.
  ckpt.save(7, tree, {'step': 7}, metrics={'val_score': 0.05})
  ckpt.wait()
  assert ckpt.all_steps() == [7] and ckpt.best_step() == 7
  assert ckpt.restore_meta(7) == {'step': 7}
  ckpt.close()


def _saved_run(tmp_path) -> str:
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, make_state(), META)
  return os.path.join(str(tmp_path), '3')


@pytest.mark.parametrize('damage', ['delete', 'truncate'])
def test_corrupt_checkpoint(tmp_path, damage):
  step_dir = _saved_run(tmp_path)
  data_files = glob.glob(os.path.join(step_dir, 'state', 'd', '*'))
  assert data_files
  for path in data_files:
    if damage == 'delete':
      os.remove(path)
    else:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3  # Orbax does not notice until restore.
    with pytest.raises(CheckpointError, match='corrupt') as info:
      ckpt.restore(None, abstract_state())
    assert step_dir in str(info.value)
    assert 'tensorstore_spec' not in str(info.value)


def test_restore_error_is_wrapped(tmp_path, monkeypatch):
  """Errors Orbax raises only while reading the arrays (NOT_FOUND ... zarr) are wrapped."""
  step_dir = _saved_run(tmp_path)
  original = ValueError('NOT_FOUND: Error opening "zarr" driver [tensorstore_spec=\'{...}\']')

  def failing_restore(*args, **kwargs):
    raise original

  with Checkpointer(tmp_path) as ckpt:
    monkeypatch.setattr(ckpt._manager, 'restore', failing_restore)
    with pytest.raises(CheckpointError, match='corrupt or incomplete') as info:
      ckpt.restore(3, abstract_state())
  assert step_dir in str(info.value) and 'NOT_FOUND' in str(info.value)
  assert 'tensorstore_spec' not in str(info.value)
  assert info.value.__cause__ is original


def test_missing_meta_file(tmp_path):
  step_dir = _saved_run(tmp_path)
  os.remove(os.path.join(step_dir, 'meta', 'metadata'))
  with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as info:
    ckpt.restore_meta()
  assert os.path.join(step_dir, 'meta') in str(info.value)


def test_shape_mismatch(tmp_path):
  step_dir = _saved_run(tmp_path)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError) as info:
      ckpt.restore(3, abstract_state(in_features=5))
    message = str(info.value)
    assert step_dir in message
    assert "'generator.params.kernel': expected shape (5, 3), found (4, 3)" in message
    assert "'generator.opt_state.0.mu.kernel'" in message
    # A structural difference: one leaf less in the target.
    target = abstract_state()
    target['generator'] = target['generator'].replace(batch_stats={'mean': target['rng']})
    with pytest.raises(CheckpointError, match="not in the target: 'generator.batch_stats.var'"):
      ckpt.restore(3, target)


def test_unfinished_tmp_folder_is_ignored(tmp_path):
  step_dir = _saved_run(tmp_path)
  # What a save killed midway leaves behind.
  shutil.copytree(step_dir, os.path.join(str(tmp_path), '4.orbax-checkpoint-tmp-1234567'))
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    _, meta = ckpt.restore(None, abstract_state())
    assert meta == META
    ckpt.save(4, make_state(), {'resumed': True})
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 4 and ckpt.restore_meta() == {'resumed': True}


def test_errors_without_checkpoints_and_bad_inputs(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None and ckpt.best_step() is None
    with pytest.raises(CheckpointError, match=f'no checkpoint in {tmp_path}'):
      ckpt.restore(None, abstract_state())
    with pytest.raises(CheckpointError, match='no checkpoint in'):
      ckpt.restore_meta()
    with pytest.raises(TypeError, match='not JSON-serialisable'):
      ckpt.save(1, make_state(), {'x': np.float32(1.0)})
    ckpt.save(1, make_state(), {})
    with pytest.raises(CheckpointError, match='steps must increase'):
      ckpt.save(1, make_state(), {})
    with pytest.raises(CheckpointError, match=os.path.join(str(tmp_path), '2')):
      ckpt.restore(2, abstract_state())
  with pytest.raises(ValueError, match='keep_latest'):
    Checkpointer(tmp_path, keep_latest=0)


def test_latest_step_with_metrics_outlives_steps_without(tmp_path):
  # Preemption checkpoints have no metrics; they must not push out the last evaluated one.
  with Checkpointer(tmp_path / 'ckpt', keep_latest=2, keep_best=1) as ckpt:
    ckpt.save(1, trained_state(), META, metrics={'val_score': 0.1})  # The best.
    ckpt.save(2, trained_state(), META, metrics={'val_score': 0.5})  # The latest evaluated.
    for step in (3, 4, 5):
      ckpt.save(step, trained_state(), META)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 4, 5]
    assert ckpt.best_step() == 1


def test_delete_then_save_the_same_step(tmp_path):
  with Checkpointer(tmp_path / 'ckpt') as ckpt:
    ckpt.save(1, trained_state(0), META, metrics={'val_score': 0.2})
    ckpt.save(2, trained_state(0), {'first': True})
    ckpt.delete(2)
    assert ckpt.all_steps() == [1]
    ckpt.save(2, trained_state(1), META, metrics={'val_score': 0.1})
    state, meta = ckpt.restore(2, abstract_state())
  assert meta == META
  assert_trees_equal(state, trained_state(1))


def test_abstract_state_restores_without_the_classes(tmp_path):
  saved = trained_state()
  with Checkpointer(tmp_path / 'ckpt') as ckpt:
    ckpt.save(1, saved, META)
    abstract = ckpt.abstract_state()
    state, _ = ckpt.restore(1, abstract)
  assert type(state['generator']) is dict  # Plain containers, no TrainState.
  np.testing.assert_array_equal(
    state['generator']['params']['kernel'], saved['generator'].params['kernel']
  )
  np.testing.assert_array_equal(state['rng'], saved['rng'])
