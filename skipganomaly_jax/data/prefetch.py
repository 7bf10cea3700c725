"""Host input prefetch: a training set too large for the devices, batched ahead in a thread.

`PrefetchIterator` wraps a `TrainIterator`: a background thread gathers, scales and
places (`place`, e.g. onto the mesh) the next `depth` batches while the devices compute
the current step, so a step waits for its batch only when the host is slower than the
devices. The batches and their order are exactly the wrapped iterator's (one thread
calls it, in order), and `get_state` is the position of the batches handed out, not of
those made ahead: a checkpoint taken at any moment resumes with the next batch the
training loop had not received, bit-identical to an unprefetched run.

The thread is stopped (and the made-ahead batches dropped) by `close`, by `set_state`
to another position, when the iterator is garbage-collected, and after it raises; an
exception in the thread is raised by the `next()` that would have returned its batch.
"""

import queue
import threading
import weakref

from skipganomaly_jax.data.batches import TrainIterator

PREFETCH_BATCHES = 2  # Batches made ahead of the training loop (host + device memory).
_POLL_SECONDS = 0.1  # How often a blocked producer looks for the stop request.


def _produce(source, place, batches: queue.Queue, stop: threading.Event) -> None:
  """The thread: (batch, position after it, None) per batch; (None, None, error) at the
  first exception. Holds no reference to the PrefetchIterator (so it can be collected)."""
  try:
    while not stop.is_set():
      batch = next(source)
      item = (place(batch), source.get_state(), None)
      while not stop.is_set():
        try:
          batches.put(item, timeout=_POLL_SECONDS)
          break
        except queue.Full:
          continue
  except BaseException as error:  # noqa: BLE001  (handed to the consumer, raised there)
    while not stop.is_set():
      try:
        batches.put((None, None, error), timeout=_POLL_SECONDS)
        return
      except queue.Full:
        continue


def _stop(thread: threading.Thread | None, stop: threading.Event, batches: queue.Queue):
  """Stops the producer and waits for it (it wakes within _POLL_SECONDS)."""
  stop.set()
  if thread is not None and thread is not threading.current_thread():
    thread.join()
  while not batches.empty():
    batches.get_nowait()


class PrefetchIterator:
  """A `TrainIterator`'s batches, made `depth` ahead by a background thread.

  Same `steps_per_epoch`, `local_batch_size`, batches, order, `get_state` and
  `set_state` as the wrapped iterator. The thread starts at the first `next()`.

  Args:
    source: the TrainIterator (owned from now on: only the thread advances it).
    depth: batches made ahead (>= 1).
    place: applied to each batch in the thread (e.g. `parallel.shard_batch` onto the
      mesh, so that the host-to-device copy is made ahead too); default: none.
  """

  def __init__(self, source: TrainIterator, depth: int = PREFETCH_BATCHES, place=None):
    if depth < 1:
      raise ValueError(f'depth must be >= 1, got {depth}.')
    self._source, self._depth = source, int(depth)
    self._place = place or (lambda batch: batch)
    self.steps_per_epoch = source.steps_per_epoch
    self.local_batch_size = source.local_batch_size
    self._state = source.get_state()  # Position of the batches handed out.
    self._thread, self._finalizer = None, None

  def __iter__(self) -> 'PrefetchIterator':
    return self

  def _start(self) -> None:
    self._batches, self._stop = queue.Queue(maxsize=self._depth), threading.Event()
    self._thread = threading.Thread(
      target=_produce,
      args=(self._source, self._place, self._batches, self._stop),
      name='train-batch-prefetch',
      daemon=True,  # Never keeps the interpreter alive; close() ends it in order.
    )
    self._thread.start()
    self._finalizer = weakref.finalize(self, _stop, self._thread, self._stop, self._batches)

  def __next__(self):
    if self._thread is None:
      self._start()
    batch, state, error = self._batches.get()
    if error is not None:
      self.close()
      raise error
    self._state = state
    return batch

  def close(self) -> None:
    """Stops the thread and drops the batches made ahead; `next()` restarts it at
    `get_state()`. Safe to call at any time, twice too."""
    if self._thread is None:
      return
    self._finalizer()  # _stop, once.
    self._thread, self._finalizer = None, None
    self._source.set_state(self._state)  # The thread ran ahead: back to what was handed out.

  def get_state(self) -> dict:
    """The position after the last batch handed out (see TrainIterator.get_state)."""
    return dict(self._state)

  def set_state(self, state: dict) -> None:
    """Resumes from `state`. The same position as now (the end of an epoch is the start
    of the next) keeps the batches made ahead; another restarts the thread there."""
    if self._thread is not None and self._same_position(state, self._state):
      self._state = {k: int(state[k]) for k in ('epoch', 'step_in_epoch')}
      return
    self.close()
    self._source.set_state(state)
    self._state = self._source.get_state()

  def _same_position(self, a: dict, b: dict) -> bool:
    def normal(s):
      epoch, step = int(s['epoch']), int(s['step_in_epoch'])
      return (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

    return normal(a) == normal(b)
