"""The authors' own Skip-GANomaly (PyTorch), trained and tested on exactly our split.

For each abnormal class it builds our split with this project's input pipeline (the
config's protocol and seed: the same training normals our model trains on, validation
images excluded, and the same normal-first test set), then runs the official code,
imported at run time from --reference_dir (never copied here):
  - `lib.models.skipganomaly.Skipganomaly` with its own options (`options.Options`, with
    --device cpu, batch 64, isize 32, nc 3, niter = --epochs, manualseed = --seed);
  - each epoch: its `train_one_epoch()` (its `optimize_params()` on shuffled batches of
    64, last partial batch dropped) then its `test()`: BatchNorm in training mode on the
    unshuffled normal-first test batches of 64, paper score min-max scaled, AUROC;
  - the reported number is its protocol's: the maximum test AUROC over epochs.
Data: uint8 images -> float [-1, 1] (= its ToTensor + Normalize(0.5, 0.5)), NCHW. Its
buffers are 3-channel (SPEC), so 1-channel data (MNIST) is fed as 3 identical channels
with --nc 3: the official code cannot train 1-channel images at all.

Patches applied at run time, both forced by running it on torch 2.x (the same two the
parity fixture needed), nothing else changed:
  1. `self.noise` is an uninitialised `torch.empty` added to every training input and
     never filled: it is zeroed after construction (clean inputs, as intended).
  2. Its D backward crashes on torch >= 1.5 (G's weights were updated in place by G's
     step before D's backward walks through G's graph). A subclass replaces
     `backward_d` with the same losses and `err_d.backward(inputs=D's parameters)`, which
     gives D exactly torch <= 1.4's gradients (G's gradients from it were discarded anyway:
     G's optimiser zeroes them before its next step).
torchvision, seaborn and visdom are not needed by the model and training code and are
stubbed (torchvision does not load beside torch 2.13 here). torch uses --threads threads.

Resumable: after every epoch the networks, both optimisers, the RNG states and the AUROC
history are saved to RUNS/<class>/state.pt (atomically; deleted when the class is done
unless --keep_state); a rerun skips finished classes and continues a class from its last
finished epoch (a killed epoch restarts). Results (per class: AUROC per epoch, max,
best epoch, seconds per epoch, the commit) go to --out as JSON after every epoch, with the
commit and command line of the last write (benchmarks/provenance.py).

    python benchmarks/reference_run.py --config=configs/cifar10_arrays.py \
        --dataset_path=../shared/data/cifar10_dev.npz \
        --classes=airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck \
        --runs=runs/official_cifar10 --out=benchmarks/results/quality_cifar10_dev/official.json
"""

import argparse
import json
import os
import pathlib
import random
import sys
import time
import types

import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import build_config  # noqa: E402
from skipganomaly_jax import config as config_lib  # noqa: E402
from skipganomaly_jax.data import input_pipeline  # noqa: E402


class _Inert:
  """Any attribute, any call: returns itself (stands in for plotting and image saving)."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return self

  def __call__(self, *args, **kwargs):
    return self


def _module_attribute(name: str):
  if name.startswith('__'):  # __file__, __path__, ...: absent, as introspection expects.
    raise AttributeError(name)
  return _Inert()


def stub_modules() -> None:
  """torchvision / seaborn / visdom as inert modules (only plotting code uses them)."""
  for name in ('torchvision', 'torchvision.utils', 'torchvision.transforms', 'seaborn', 'visdom'):
    if name in sys.modules:
      continue
    module = types.ModuleType(name)
    module.__getattr__ = _module_attribute
    sys.modules[name] = module
  sys.modules['torchvision'].utils = sys.modules['torchvision.utils']


def import_reference(reference_dir: str):
  """(Options, Skipganomaly, torch) of the official code, with the two patches."""
  if not (pathlib.Path(reference_dir) / 'lib' / 'models' / 'skipganomaly.py').is_file():
    raise FileNotFoundError(
      f'{reference_dir} is not the skip-ganomaly repository (no lib/models/skipganomaly.py): '
      'pass --reference_dir=/path/to/skip-ganomaly.'
    )
  stub_modules()
  sys.path.insert(0, os.path.abspath(reference_dir))
  import torch  # noqa: PLC0415
  from lib.models.skipganomaly import Skipganomaly  # noqa: PLC0415
  from options import Options  # noqa: PLC0415

  class Patched(Skipganomaly):
    """The official model with the two torch-2 fixes (module doc)."""

    def __init__(self, opt, data):
      super().__init__(opt, data)
      self.noise.zero_()  # Patch 1: never filled in the original.

    def backward_d(self):  # Patch 2: the original's losses, backward restricted to D.
      pred_fake, _ = self.netd(self.fake.detach())
      self.err_d_fake = self.l_adv(pred_fake, self.fake_label)
      self.err_d_real = self.l_adv(self.pred_real, self.real_label)
      self.err_d = self.err_d_real + self.err_d_fake + self.err_g_lat
      self.err_d.backward(inputs=list(self.netd.parameters()))

  return Options, Patched, torch


def to_tensor(images: np.ndarray, torch):
  """uint8 NHWC -> float32 NCHW in [-1, 1], 1 channel repeated to 3."""
  x = images.astype(np.float32) / 127.5 - 1.0
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def build_model(args, torch, Options, Patched, splits, outf: str):
  """The official model and its data loaders on our split."""
  from torch.utils.data import DataLoader, TensorDataset  # noqa: PLC0415

  train = splits.train
  if args.max_steps_per_epoch:  # Smoke tests only: fewer training images.
    train = train[: args.max_steps_per_epoch * 64]
  argv = sys.argv
  sys.argv = [
    'train.py',
    *('--device', 'cpu', '--gpu_ids', '-1', '--nc', '3', '--isize', '32', '--batchsize', '64'),
    *('--niter', str(args.epochs), '--manualseed', str(args.seed), '--outf', outf),
    *('--save_image_freq', str(10**9), '--print_freq', str(10**9)),
  ]
  try:
    opt = Options().parse()
  finally:
    sys.argv = argv
  train_ds = TensorDataset(to_tensor(train, torch), torch.zeros(len(train), dtype=torch.long))
  test_ds = TensorDataset(
    to_tensor(splits.test, torch), torch.from_numpy(splits.test_labels.astype(np.int64))
  )
  data = types.SimpleNamespace(
    train=DataLoader(train_ds, batch_size=64, shuffle=True, drop_last=True),
    valid=DataLoader(test_ds, batch_size=64, shuffle=False, drop_last=False),
  )
  return Patched(opt, data)


def _rng_states(torch) -> dict:
  return {
    'torch': torch.get_rng_state(),
    'numpy': np.random.get_state(),
    'python': random.getstate(),
  }


def _set_rng_states(torch, states: dict) -> None:
  torch.set_rng_state(states['torch'])
  np.random.set_state(states['numpy'])
  random.setstate(states['python'])


def save_state(path: pathlib.Path, model, torch, history: dict) -> None:
  """Networks, optimisers, RNG states and history, written atomically."""
  state = {
    'netg': model.netg.state_dict(),
    'netd': model.netd.state_dict(),
    'optimizer_g': model.optimizer_g.state_dict(),
    'optimizer_d': model.optimizer_d.state_dict(),
    'rng': _rng_states(torch),
    'history': history,
  }
  tmp = path.with_suffix('.tmp')
  torch.save(state, tmp)
  os.replace(tmp, path)


def run_class(args, cls: str, torch, Options, Patched, results: dict, out: pathlib.Path):
  """Trains (or resumes) the official model for one abnormal class."""
  config = build_config(args.config, args.set, cls, args.seed)
  if args.dataset_path:
    config.dataset.path = args.dataset_path
  splits = input_pipeline.load_splits(config_lib.specs(config).data)
  workdir = pathlib.Path(args.runs) / cls
  workdir.mkdir(parents=True, exist_ok=True)
  model = build_model(args, torch, Options, Patched, splits, str(workdir / 'output'))
  state_path = workdir / 'state.pt'
  history = {'auroc': [], 'seconds': []}
  if state_path.exists():
    state = torch.load(state_path, weights_only=False)
    model.netg.load_state_dict(state['netg'])
    model.netd.load_state_dict(state['netd'])
    model.optimizer_g.load_state_dict(state['optimizer_g'])
    model.optimizer_d.load_state_dict(state['optimizer_d'])
    _set_rng_states(torch, state['rng'])
    history = state['history']
    print(f'{cls}: resumed after epoch {len(history["auroc"])}', flush=True)
  for epoch in range(len(history['auroc']), args.epochs):
    model.epoch, model.total_steps = epoch, 0
    start = time.perf_counter()
    model.train_one_epoch()
    train_seconds = time.perf_counter() - start
    auroc = float(model.test()['AUC'])
    history['auroc'].append(auroc)
    history['seconds'].append(time.perf_counter() - start)
    history.setdefault('train_seconds', []).append(train_seconds)
    save_state(state_path, model, torch, history)
    results[cls] = summarise(history, splits, args)
    write_results(out, results, args)
    print(
      f'{cls}: epoch {epoch + 1}/{args.epochs} AUROC {auroc:.4f} ({history["seconds"][-1]:.1f} s)',
      flush=True,
    )
  results[cls] = summarise(history, splits, args)
  write_results(out, results, args)
  if not args.keep_state:  # 0.2 GB per class; the results JSON now says it is done.
    state_path.unlink(missing_ok=True)


def summarise(history: dict, splits, args) -> dict:
  aurocs = history['auroc']
  return {
    'official_max_auroc': max(aurocs),
    'official_best_epoch': int(np.argmax(aurocs)) + 1,
    'official_last_auroc': aurocs[-1],
    'curve': aurocs,
    'epochs_done': len(aurocs),
    'finished': len(aurocs) >= args.epochs,
    'seconds_per_epoch': float(np.mean(history['seconds'])),
    'train_seconds_per_epoch': float(np.mean(history.get('train_seconds', history['seconds']))),
    'num_train': int(len(splits.train)),
    'num_test_normal': int((splits.test_labels == 0).sum()),
    'num_test_abnormal': int((splits.test_labels == 1).sum()),
    'commit': provenance()['commit'],  # Classes resume across sessions: each its own.
  }


def write_results(out: pathlib.Path, results: dict, args) -> None:
  setup = (
    f'official skip-ganomaly ({args.reference_dir}), config={args.config}, '
    f'dataset_path={args.dataset_path or "-"}, overrides={args.set or "none"}, seed={args.seed}, '
    f'epochs={args.epochs}, torch threads={args.threads}'
    + (
      f', max_steps_per_epoch={args.max_steps_per_epoch} (SMOKE)'
      if args.max_steps_per_epoch
      else ''
    )
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix('.tmp')
  tmp.write_text(json.dumps({'setup': setup, **provenance(), 'classes': results}, indent=2))
  os.replace(tmp, out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/cifar10_arrays.py')
  parser.add_argument('--dataset_path', default='', help='sets config.dataset.path')
  parser.add_argument('--classes', default='automobile')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--set', action='append', default=[], help='config key=value override')
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--max_steps_per_epoch', type=int, default=0, help='smoke tests only')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument(
    '--keep_state', action='store_true', help="keep a finished class's state.pt (0.2 GB)"
  )
  parser.add_argument(
    '--reference_dir', default=str(ROOT.parent / 'shared' / 'reference' / 'skip-ganomaly')
  )
  parser.add_argument('--runs', default=str(ROOT / 'runs' / 'official'))
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'official.json'))
  args = parser.parse_args()
  # Paths are relative to where the command runs; the config module is imported from ROOT.
  for name in ('dataset_path', 'reference_dir', 'runs', 'out'):
    value = getattr(args, name)
    setattr(args, name, os.path.abspath(value) if value else value)
  os.chdir(ROOT)
  Options, Patched, torch = import_reference(args.reference_dir)
  torch.set_num_threads(args.threads)
  out = pathlib.Path(args.out)
  results = json.loads(out.read_text())['classes'] if out.exists() else {}
  for cls in args.classes.split(','):
    if results.get(cls, {}).get('epochs_done', 0) >= args.epochs:
      print(f'{cls}: done, skipped', flush=True)
      continue
    run_class(args, cls, torch, Options, Patched, results, out)
  print(json.dumps({k: v['official_max_auroc'] for k, v in results.items()}, indent=1))


if __name__ == '__main__':
  main()
