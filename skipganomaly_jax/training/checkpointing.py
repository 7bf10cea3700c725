"""Checkpoints of a training run: a thin wrapper over `orbax.checkpoint.CheckpointManager`.

Each step directory `DIR/<step>/` holds two items:

- `state`: any pytree of jax/numpy arrays, Python scalars and flax struct dataclasses
  (e.g. a flax `TrainState` with an optax state), saved with `ocp.args.StandardSave` and
  restored with `ocp.args.StandardRestore(target)` so that the target's own classes come
  back (without a target Orbax returns plain dicts and lists);
- `meta`: a JSON dict (config, calibration, data-iterator position, ...), readable on its
  own with `Checkpointer.restore_meta`.

Optional metrics (e.g. `{'val_score': 0.12}`) are stored by Orbax next to them; the
validation score (lower is better) ranks checkpoints.

Preservation: the latest `keep_latest` steps are always kept, *and* the `keep_best` steps
with the lowest `val_score`, *and* the latest step that has metrics (steps saved without
metrics, e.g. on preemption, never push the last evaluated step out). (A plain `best_fn` +
`max_to_keep` can delete the latest checkpoint and break resuming; see docs/stack.md,
Orbax.) All Orbax options are built by `_manager_options`, so a reopened directory gets
exactly the same policy.

Saving is asynchronous: `save` returns once the arrays are copied to host memory; `wait`
blocks until the step is on disk. Failures to read a checkpoint are raised as
`CheckpointError`, naming the step directory and what is wrong; in particular the target
is compared with the stored shapes before restoring, and files deleted from or truncated
in a finished step (which Orbax only notices while restoring) are reported clearly.
"""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

STATE_ITEM = 'state'
META_ITEM = 'meta'
METRIC_NAME = 'val_score'
_META_FILE = 'metadata'  # The file of the meta item (Orbax's JsonCheckpointHandler's name).
UNREAD = ocp.PLACEHOLDER  # A target leaf that `restore` leaves unread (a partial restore).
_MAX_LISTED = 5


class CheckpointError(Exception):
  """A checkpoint cannot be read: missing, corrupt, or not matching the target."""


def _val_score(metrics: Mapping[str, Any] | None) -> float:
  """Ranking metric (lower is better); a missing or NaN `val_score` ranks worst (+inf)."""
  value = (metrics or {}).get(METRIC_NAME)
  if value is None or math.isnan(float(value)):
    return math.inf
  return float(value)


class _LatestWithMetrics:
  """Orbax preservation policy: keeps the most recent checkpoint that has metrics."""

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    with_metrics = [i for i, info in enumerate(checkpoints) if info.metrics is not None]
    keep = with_metrics[-1] if with_metrics else None
    return [i == keep for i in range(len(checkpoints))]


def _manager_options(keep_latest: int, keep_best: int) -> ocp.CheckpointManagerOptions:
  """The one place where Orbax's options are built (for new and reopened directories)."""
  policy = ocm.AnyPreservationPolicy(
    policies=[
      ocm.LatestN(n=keep_latest),
      # BestN keeps the *last* n of the checkpoints sorted by the metric; reverse=True
      # sorts in descending order, so the last n have the lowest val_score.
      ocm.BestN(
        get_metric_fn=_val_score,
        reverse=True,
        n=keep_best,
        keep_checkpoints_without_metrics=False,
      ),
      _LatestWithMetrics(),
    ]
  )
  return ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    # Not used for deletion (the policy above decides), but Orbax only writes metrics and
    # answers best_step() when best_fn is set.
    best_fn=_val_score,
    best_mode='min',
    enable_async_checkpointing=True,
  )


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Registers both items, so that a freshly opened manager can read their metadata."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(STATE_ITEM, ocp.args.StandardSave)
  registry.add(STATE_ITEM, ocp.args.StandardRestore)
  registry.add(STATE_ITEM, ocp.args.PyTreeRestore)  # Partial restores (UNREAD leaves).
  registry.add(META_ITEM, ocp.args.JsonSave)
  registry.add(META_ITEM, ocp.args.JsonRestore)
  return registry


def _short(e: BaseException, limit: int = 400) -> str:
  """A one-line summary of an exception, without TensorStore's long spec dump."""
  text = str(e).split(' [tensorstore_spec=')[0].replace('\n', ' ')
  if len(text) > limit:
    text = text[:limit] + '...'
  return f'{type(e).__name__}: {text}'


def _key_str(key: Any) -> str:
  """The name of one jax key-path entry (dict key, attribute, or sequence index)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
  """The stored shape of a leaf; typed PRNG keys are stored as their key data; None for
  an UNREAD leaf (any stored shape matches it)."""
  if leaf is UNREAD:
    return None
  dtype = getattr(leaf, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Maps each leaf's key path (as strings, as Orbax names them) to its shape."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(_key_str(k) for k in path): _leaf_shape(leaf) for path, leaf in leaves}


def _describe_mismatch(stored: dict, expected: dict) -> list[str]:
  """Lists differences between stored and target leaves (paths and shapes)."""
  name = lambda path: '.'.join(path) or '<root>'
  missing = [p for p in expected if p not in stored]
  unexpected = [p for p in stored if p not in expected]
  differing = [p for p in expected if p in stored and expected[p] not in (None, stored[p])]
  problems = [
    f'leaf {name(p)!r}: expected shape {expected[p]}, found {stored[p]}'
    for p in differing[:_MAX_LISTED]
  ]
  if missing:
    listed = ', '.join(repr(name(p)) for p in missing[:_MAX_LISTED])
    problems.append(f'{len(missing)} target leaf/leaves not in the checkpoint: {listed}')
  if unexpected:
    listed = ', '.join(repr(name(p)) for p in unexpected[:_MAX_LISTED])
    problems.append(f'{len(unexpected)} checkpoint leaf/leaves not in the target: {listed}')
  if len(differing) > _MAX_LISTED:
    problems.append(f'and {len(differing) - _MAX_LISTED} more leaves with other shapes')
  return problems


def _restore_args(target: Any):
  """StandardRestore of `target`; PyTreeRestore when it has UNREAD leaves (a partial
  restore: StandardRestore refuses placeholders, PyTreeRestore skips them)."""
  if not any(leaf is UNREAD for leaf in jax.tree.leaves(target)):
    return ocp.args.StandardRestore(target)
  restore_args = jax.tree.map(
    lambda leaf, arg: UNREAD if leaf is UNREAD else arg,
    target,
    ocp.checkpoint_utils.construct_restore_args(target),
  )
  return ocp.args.PyTreeRestore(item=target, restore_args=restore_args)


def _unreadable_metrics(directory: str) -> list[str]:
  """Paths of step metrics files that are not valid JSON (they break opening a run)."""
  bad = []
  for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    path = os.path.join(directory, entry, 'metrics', 'metrics')
    if os.path.isfile(path):
      try:
        with open(path) as f:
          json.load(f)
      except ValueError:
        bad.append(path)
  return bad


class Checkpointer:
  """Saves and restores a training run's state and metadata in one directory.

  Example::

    ckpt = Checkpointer(workdir + '/checkpoints')
    ckpt.save(step, state, meta={'config': cfg.to_dict()}, metrics={'val_score': 0.1})
    ...
    state, meta = ckpt.restore(None, target=jax.eval_shape(make_state))
    ckpt.close()

  Args:
    directory: the run's checkpoint directory (created if absent).
    keep_latest: how many of the most recent steps to keep (at least 1).
    keep_best: how many steps with the lowest `val_score` metric to keep, in addition.
  """

  def __init__(self, directory: str | os.PathLike, keep_latest: int = 2, keep_best: int = 1):
    if keep_latest < 1:
      raise ValueError(
        f'keep_latest must be >= 1 (the latest step is needed to resume), got {keep_latest}'
      )
    if keep_best < 0:
      raise ValueError(f'keep_best must be >= 0, got {keep_best}')
    self.directory = os.path.abspath(os.fspath(directory))
    self._closed = False
    try:
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=_manager_options(keep_latest, keep_best),
        handler_registry=_handler_registry(),
      )
    except Exception as e:
      bad = _unreadable_metrics(self.directory)
      hint = f'; unreadable metrics file(s): {bad}' if bad else ''
      raise CheckpointError(
        f'cannot open checkpoint directory {self.directory}: {_short(e)}{hint}'
      ) from e

  def step_path(self, step: int) -> str:
    """The directory of one step's checkpoint."""
    return os.path.join(self.directory, str(step))

  def save(
    self, step: int, state: Any, meta: Mapping[str, Any], metrics: Mapping | None = None
  ) -> None:
    """Starts saving `state` and `meta` as step `step`; returns before the write ends.

    Args:
      step: the training step; must be larger than every step saved before.
      state: a pytree of jax/numpy arrays, scalars and flax struct dataclasses. Typed
        PRNG keys are supported; storing `jax.random.key_data(key)` is the portable way.
      meta: a JSON-serialisable dict (tuples come back as lists). Copied at once.
      metrics: optional numbers, e.g. `{'val_score': 0.12}` (lower is better; ranks the
        checkpoints kept by `keep_best`). Steps without metrics are kept as latest only.
    """
    try:
      meta = json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as e:
      raise TypeError(f'checkpoint meta for step {step} is not JSON-serialisable: {e}') from e
    if metrics is not None:
      try:
        metrics = {str(k): float(v) for k, v in metrics.items()}
      except (TypeError, ValueError) as e:
        raise TypeError(f'checkpoint metrics must be numbers, got {metrics!r}') from e
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      raise CheckpointError(
        f'cannot save step {step} to {self.step_path(step)}: steps must increase and the '
        f'latest saved step is {latest}'
      )
    args = ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
    )
    if not self._manager.save(step, args=args, metrics=metrics):
      raise CheckpointError(f'Orbax declined to save step {step} to {self.step_path(step)}')

  def all_steps(self) -> list[int]:
    """All steps present (saved or being saved), in increasing order."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The most recent step, or None if there is none (unfinished tmp folders ignored)."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest `val_score`, or None if no step has metrics."""
    return self._manager.best_step()

  def _resolve_step(self, step: int | None) -> int:
    """Returns `step`, or the latest step if None; raises if it is not present."""
    self._manager.wait_until_finished()  # Never read a step that is still being written.
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(
        f'no checkpoint {self.step_path(step)}: the steps in {self.directory} are {steps}'
      )
    return step

  def _stored_tree(self, step: int) -> Any:
    """The stored state's tree of leaf metadata (shapes, dtypes) of one step."""
    path = self.step_path(step)
    try:
      item = self._manager.item_metadata(step).get(STATE_ITEM)
    except Exception as e:
      raise CheckpointError(
        f'checkpoint {path} is corrupt or incomplete: cannot read its metadata ({_short(e)})'
      ) from e
    if item is None:
      raise CheckpointError(
        f'checkpoint {path} is corrupt or incomplete: no readable {STATE_ITEM!r} item '
        f'(missing {os.path.join(path, STATE_ITEM, "_METADATA")}?)'
      )
    return getattr(item, 'tree', item)

  def _check_target(self, step: int, target: Any) -> None:
    """Compares the stored tree of leaves and shapes with `target`, before restoring."""
    path = self.step_path(step)
    problems = _describe_mismatch(_flat_shapes(self._stored_tree(step)), _flat_shapes(target))
    if problems:
      raise CheckpointError(
        f'checkpoint {path} does not match the target state (was it saved by a model of '
        f'another configuration, e.g. another image size?): ' + '; '.join(problems)
      )

  def abstract_state(self, step: int | None = None) -> Any:
    """The stored state tree of one step (None = the latest) as `jax.ShapeDtypeStruct`s.

    Restoring with it as the target needs none of the classes that saved the state: it
    comes back as plain dicts and lists (flax dataclasses as dicts of their fields).
    """
    step = self._resolve_step(step)
    return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), self._stored_tree(step)
    )

  def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
    """Restores the state and meta of one step.

    Args:
      step: the step to restore; None = the latest.
      target: a pytree of the saved structure whose leaves are concrete arrays or
        `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape` of the state constructor); its
        classes, dtypes and shardings are those of the result. Leaves that are UNREAD
        are not read (they come back as UNREAD).

    Returns:
      (state, meta).

    Raises:
      CheckpointError: no such checkpoint, a corrupt one, or one that does not match
        `target` (the message names the leaf path and the expected and found shapes).
    """
    step = self._resolve_step(step)
    self._check_target(step, target)
    args = ocp.args.Composite(
      **{STATE_ITEM: _restore_args(target), META_ITEM: ocp.args.JsonRestore()}
    )
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:
      raise CheckpointError(
        f'checkpoint {self.step_path(step)} is corrupt or incomplete: {_short(e)}'
      ) from e
    return restored[STATE_ITEM], dict(restored[META_ITEM])

  def restore_meta(self, step: int | None = None) -> dict:
    """Restores only the meta dict of one step (None = the latest); needs no target."""
    step = self._resolve_step(step)
    args = ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
    try:
      return dict(self._manager.restore(step, args=args)[META_ITEM])
    except Exception as e:
      raise CheckpointError(
        f'checkpoint meta {os.path.join(self.step_path(step), META_ITEM)} is unreadable: '
        f'{_short(e)}'
      ) from e

  def update_meta(self, step: int, updates: Mapping[str, Any]) -> None:
    """Adds or replaces keys of one finished step's meta, in place.

    For what a later evaluation computes for exactly these networks (e.g. the maps'
    scale, which older versions did not store). The meta item's JSON file is rewritten
    atomically (written beside it, then renamed), so a reader sees the old or the new.
    """
    step = self._resolve_step(step)
    meta = self.restore_meta(step)
    try:
      meta.update(json.loads(json.dumps(dict(updates))))
    except (TypeError, ValueError) as e:
      raise TypeError(f'checkpoint meta for step {step} is not JSON-serialisable: {e}') from e
    path = os.path.join(self.step_path(step), META_ITEM, _META_FILE)
    if not os.path.isfile(path):
      raise CheckpointError(f'checkpoint meta {path} is missing: cannot update it')
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump(meta, f)
    os.replace(tmp, path)

  def delete(self, step: int) -> None:
    """Deletes one step's checkpoint (after any pending save has finished)."""
    step = self._resolve_step(step)
    self._manager.delete(step)

  def wait(self) -> None:
    """Blocks until all pending saves (and deletions of old steps) are finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's resources. Safe to call twice."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
