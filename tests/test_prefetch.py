"""PrefetchIterator: the host batches of TrainIterator, made ahead by a thread, in the
same order, resumable at the position handed out, and shut down cleanly."""

import itertools
import threading

import numpy as np
import pytest

from skipganomaly_jax.data import input_pipeline as ip

IMAGES = np.arange(22, dtype=np.uint8).reshape(22, 1, 1, 1)  # Image i has value i.


def ids(batch) -> list[int]:
  return [round((float(v) + 1) * 127.5) for v in np.asarray(batch).ravel()]


def take(iterator, n: int) -> list[list[int]]:
  return [ids(b) for b in itertools.islice(iterator, n)]


def new_threads(before: set) -> list[threading.Thread]:
  return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_same_batches_and_resume_as_the_unprefetched_iterator():
  before = set(threading.enumerate())
  plain = take(ip.TrainIterator(IMAGES, 4, seed=3), 14)  # 5 steps per epoch: 2.8 epochs.
  it = ip.PrefetchIterator(ip.TrainIterator(IMAGES, 4, seed=3), depth=2)
  assert take(it, 6) == plain[:6]
  state = it.get_state()  # What was handed out, not what the thread made ahead.
  assert state == {'epoch': 1, 'step_in_epoch': 1}
  assert take(it, 8) == plain[6:]
  it.close()
  assert not new_threads(before)
  resumed = ip.PrefetchIterator(ip.TrainIterator(IMAGES, 4, seed=3))
  resumed.set_state(state)  # A checkpoint's position: the next batch is the 7th.
  assert take(resumed, 8) == plain[6:]
  resumed.close()
  assert not new_threads(before)


def test_capped_epochs_as_the_training_loop_runs_them():
  """train_epoch takes max_steps_per_epoch steps, then set_state(next epoch): the batches
  made ahead of another position are dropped, those of the same position kept."""
  before = set(threading.enumerate())
  got, want = [], []
  for make in (lambda: ip.PrefetchIterator(ip.TrainIterator(IMAGES, 4, 0)), None):
    it = make() if make else ip.TrainIterator(IMAGES, 4, 0)
    out = got if make else want
    for epoch, steps in enumerate((3, 5, 2)):  # Capped, whole, capped.
      out += take(it, steps)
      it.set_state({'epoch': epoch + 1, 'step_in_epoch': 0})
      if make and steps == 5:  # The end of an epoch is the next's start: thread kept.
        assert len(new_threads(before)) == 1
    it.close()
  assert got == want
  assert not new_threads(before)


class Failing(ip.TrainIterator):
  def __next__(self):
    if self.get_state()['step_in_epoch'] == 3:
      raise OSError('disk gone')
    return super().__next__()


def test_an_exception_in_the_thread_is_raised_in_order_and_ends_it():
  before = set(threading.enumerate())
  it = ip.PrefetchIterator(Failing(IMAGES, 4, 0), place=lambda b: b * 1.0)
  assert take(it, 3) == take(ip.TrainIterator(IMAGES, 4, 0), 3)
  with pytest.raises(OSError, match='disk gone'):
    next(it)
  assert not new_threads(before)
  assert it.get_state() == {'epoch': 0, 'step_in_epoch': 3}  # The last batch handed out.


def test_close_stops_a_blocked_thread_and_next_restarts_it():
  before = set(threading.enumerate())
  it = ip.PrefetchIterator(ip.TrainIterator(IMAGES, 4, 0), depth=1)
  first = take(it, 2)  # The thread is now blocked on a full queue.
  it.close()
  it.close()
  assert not new_threads(before)
  assert first + take(it, 2) == take(ip.TrainIterator(IMAGES, 4, 0), 4)
  del it  # Collected: its thread is stopped without close().
  assert not new_threads(before)
  with pytest.raises(ValueError, match='depth'):
    ip.PrefetchIterator(ip.TrainIterator(IMAGES, 4, 0), depth=0)
