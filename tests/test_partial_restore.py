"""Checkpointer.restore with UNREAD leaves: what scoring loads (trained_run.restore) is
the networks' params and batch statistics, never the optimiser's moments."""

import jax
import numpy as np
import pytest

from skipganomaly_jax.training import checkpointing


def test_unread_leaves_are_skipped_and_the_rest_still_checked(tmp_path):
  state = {
    'g': {
      'params': {'w': np.arange(12, dtype=np.float32).reshape(3, 4)},
      'opt_state': [{'mu': np.ones((3, 4), np.float32)}],
      'step': np.int32(7),
    },
    'knn_bank': np.full((5, 2), 0.5, np.float32),
  }
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {'note': 'x'})
    ckpt.wait()
    wanted = lambda path: path[0].key == 'knn_bank' or path[1].key == 'params'  # noqa: E731
    target = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf if wanted(path) else checkpointing.UNREAD, ckpt.abstract_state(1)
    )
    restored, meta = ckpt.restore(1, target)
    assert meta == {'note': 'x'}
    np.testing.assert_array_equal(restored['g']['params']['w'], state['g']['params']['w'])
    np.testing.assert_array_equal(restored['knn_bank'], state['knn_bank'])
    assert restored['g']['opt_state'][0]['mu'] is checkpointing.UNREAD
    assert restored['g']['step'] is checkpointing.UNREAD
    wrong = {**target, 'knn_bank': jax.ShapeDtypeStruct((6, 2), np.float32)}
    with pytest.raises(checkpointing.CheckpointError, match=r"'knn_bank': expected shape"):
      ckpt.restore(1, wrong)
