"""Detection quality per abnormal class: our protocol beside the reference's, one run each.

For every (abnormal class, seed) cell it trains with the given config (with
`eval_protocol='reference'`, which additionally scores the test set the reference's way after
every epoch without touching our running statistics) and records:
  - paper_last: AUROC of the paper's score, eval-mode BatchNorm, last epoch's model;
  - paper_val_selected: the same, of the epoch with the lowest mean validation-normal
    paper score (selection on held-out normals only; needs score_kind='paper');
  - knn_last: AUROC of the latent k-NN score (G's bottleneck codes, cosine, k = 5) of the
    last epoch's model;
  - pixel_knn: a baseline without any network, the same k-NN on raw pixels;
  - reference_max: our emulation of the reference's protocol, max over epochs of its test
    AUROC (BatchNorm in training mode, normal-first batches of 64: selection on the test
    set);
  - reference_shuffled: the reference's scoring of the last epoch's model on *shuffled*
    test batches (separates what train-mode BatchNorm gains from the batch order);
  - official_max: the authors' own code on exactly the same split, its own protocol (max
    over epochs), read from --official (written by benchmarks/reference_run.py);
  - paper_reported: the paper's CIFAR-10 AUROC of that class (CIFAR-10 class names only);
  - the per-epoch curves.
Finished cells are skipped (their JSON exists); an interrupted cell resumes from its
checkpoint (rerun the same command). Writes OUT/quality.json and OUT/quality.md.

    # MNIST-5k (offline digits), all 10 digits:
    python benchmarks/quality.py --config=configs/demo.py --classes=0,1,2,3,4,5,6,7,8,9 \
        --set model.ngf=64 --set model.ndf=64 --set num_epochs=15
    # CIFAR-10 dev set (arrays source), all 10 classes by name:
    python benchmarks/quality.py --config=configs/cifar10_arrays.py \
        --dataset_path=../shared/data/cifar10_dev.npz --classes=airplane,automobile,bird,cat,\
deer,dog,frog,horse,ship,truck --out=benchmarks/results/quality_cifar10_dev \
        --runs=runs/quality_cifar10_dev
"""

import argparse
import importlib
import json
import os
import pathlib
import sys
import time

import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.deploy import trained_run as api  # noqa: E402
from skipganomaly_jax.nets.models import ModelSpec  # noqa: E402
from skipganomaly_jax.parallel import make_mesh  # noqa: E402
from skipganomaly_jax.scoring import evaluation, metrics, scores
from skipganomaly_jax.training import train

# The paper's CIFAR-10 AUROCs (Akcay et al. 2019, one class abnormal; its protocol).
PAPER_CIFAR10 = {
  'airplane': 0.797,
  'automobile': 0.953,
  'bird': 0.448,
  'cat': 0.607,
  'deer': 0.602,
  'dog': 0.615,
  'frog': 0.931,
  'horse': 0.788,
  'ship': 0.659,
  'truck': 0.907,
}


def build_config(config_path: str, overrides: list[str], abnormal: str, seed: int):
  """The config of one cell: the file's config, the overrides, class, seed, protocol.

  `config_path` may end in ':ARG' (a parameterised config, as main.py's --config takes it).
  """
  path, _, arg = config_path.partition(':')
  module = importlib.import_module(path.replace('/', '.').removesuffix('.py'))
  config = module.get_config(*([arg] if arg else []))
  for item in overrides:
    key, value = item.split('=', 1)
    node, *path = key.split('.')
    target = config if not path else config[node]
    name = path[-1] if path else node
    for part in path[:-1]:
      target = target[part]
    current = target[name]
    if isinstance(current, bool):  # bool('False') is True.
      if value.lower() not in ('true', 'false'):
        raise ValueError(f'--set {key}: expected true or false, got {value!r}')
      target[name] = value.lower() == 'true'
    else:
      target[name] = type(current)(value)
  config.dataset.abnormal_class = abnormal
  config.dataset.seed = seed
  config.seed = seed
  config.eval_protocol = 'reference'
  return config


def run_cell(config, workdir: pathlib.Path) -> dict:
  """Trains one cell (or resumes it) and summarises its history."""
  start = time.perf_counter()
  train.train_and_evaluate(config, str(workdir))
  seconds = time.perf_counter() - start
  history = json.loads((workdir / 'metrics.json').read_text())['history']
  best_val = min(history, key=lambda r: r['val_score'])
  ref = [r['reference_protocol_auroc'] for r in history]
  return {
    'score_kind': config.score_kind,
    'curve_paper': [r['paper_score_auroc'] for r in history],
    'curve_knn': [r['latent_knn_auroc'] for r in history],
    'knn_last_auroc': history[-1]['latent_knn_auroc'],
    'ours_last_auroc': history[-1]['auroc'],
    'ours_last_ap': history[-1]['average_precision'],
    'ours_val_selected_auroc': best_val['auroc'],
    'ours_val_selected_epoch': best_val['epoch'],
    'reference_max_auroc': max(ref),
    'reference_best_epoch': int(np.argmax(ref)) + 1,
    'curve_ours': [r['auroc'] for r in history],
    'curve_reference': ref,
    'seconds': seconds,
    'seconds_per_epoch': seconds / len(history),
  }


def shuffled_reference_auroc(workdir: pathlib.Path, seeds=(0, 1, 2)) -> float:
  """Mean AUROC of the reference's train-mode-BN scoring on shuffled test batches."""
  model = api.restore(str(workdir))
  params, score = model.params, model.specs.score
  spec = ModelSpec.from_variables(params)
  splits = input_pipeline.load_splits(model.specs.data)
  scorer = evaluation.DatasetScorer(spec, make_mesh(), score.eval_batch_size, score.lam)
  aurocs = []
  for seed in seeds:
    perm = np.random.default_rng(seed).permutation(len(splits.test))
    scores = np.empty(len(perm))
    scores[perm] = scorer.reference_protocol(params, splits.test[perm])
    aurocs.append(metrics.auroc(splits.test_labels, scores))
  return float(np.mean(aurocs))


def fill_score_columns(cell: dict, workdir: pathlib.Path) -> None:
  """Adds paper_last / knn_last / pixel_knn AUROCs that a cell lacks.

  Cells from before the latent k-NN score (no 'score_kind') were trained and reported
  with the paper score; training does not depend on the score, so the k-NN AUROC of
  their final model is computed here from the checkpoint.
  """
  if 'score_kind' not in cell:
    cell.update(score_kind='paper', curve_paper=cell['curve_ours'])
  cell.setdefault('paper_last_auroc', cell['curve_paper'][-1])
  if cell['score_kind'] == 'paper':  # Its validation selection used the paper score.
    cell.setdefault('paper_val_selected_auroc', cell['ours_val_selected_auroc'])
  if cell['score_kind'] == 'latent_knn':
    cell.setdefault('knn_last_auroc', cell['ours_last_auroc'])
  if 'knn_last_auroc' in cell and 'pixel_knn_auroc' in cell or not workdir.exists():
    return
  model = api.restore(str(workdir))
  params, splits = model.params, input_pipeline.load_splits(model.specs.data)
  if 'knn_last_auroc' not in cell:
    no_bank = {k: v for k, v in params.items() if k != 'knn_bank'}
    bank = scores.normalise_codes(scores.score_details(no_bank, splits.train)['code'])
    knn = scores.score_details({**no_bank, 'knn_bank': bank}, splits.test)['score']
    cell['knn_last_auroc'] = metrics.auroc(splits.test_labels, np.asarray(knn))
  flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
  pixel = scores.knn_distance(flat(splits.test), scores.normalise_codes(flat(splits.train)))
  cell['pixel_knn_auroc'] = metrics.auroc(splits.test_labels, np.asarray(pixel))


COLUMNS = (  # (key, header)
  ('paper_last_auroc', 'ours, paper score (last epoch)'),
  ('paper_val_selected_auroc', 'ours, paper score (epoch selected on val. normals)'),
  ('knn_last_auroc', 'ours, latent k-NN (last)'),
  ('pixel_knn_auroc', 'baseline: pixel k-NN'),
  ('reference_max_auroc', 'our emulation of the reference protocol (max over epochs)'),
  ('official_max_auroc', 'official code, same split (its protocol: max over epochs)'),
  ('paper_reported_auroc', "paper's reported AUROC"),
  ('reference_shuffled_auroc', 'reference scoring, shuffled batches (last)'),
  ('ours_last_ap', 'AP (last, run score)'),
)


def add_external_columns(cells: dict, official: dict) -> None:
  """The official code's max AUROC (per class, finished runs only) and the paper's."""
  for key, cell in cells.items():
    cls = key.split('/')[0]
    run = official.get(cls)
    if run and run.get('finished'):
      cell['official_max_auroc'] = run['official_max_auroc']
      cell['official_best_epoch'] = run['official_best_epoch']
      cell['official_curve'] = run['curve']
    if cls in PAPER_CIFAR10:
      cell['paper_reported_auroc'] = PAPER_CIFAR10[cls]


def _mean_row(cells: dict) -> str:
  """Means over the cells that have each column; '(n=k)' when not all do."""
  parts = []
  for key, _ in COLUMNS:
    values = [c[key] for c in cells.values() if key in c]
    text = f'**{np.mean(values):.3f}**' if values else '-'
    parts.append(text + (f' (n={len(values)})' if 0 < len(values) < len(cells) else ''))
  return '| **mean** | | | ' + ' | '.join(parts) + ' | | |'


def write_tables(cells: dict, out: pathlib.Path, header: str) -> None:
  """quality.json and a markdown table with means."""
  written = {'setup': header, **provenance(), 'cells': cells}
  (out / 'quality.json').write_text(json.dumps(written, indent=2))
  lines = [
    f'Setup: {header}',
    '',
    '| abnormal | seed | run score | '
    + ' | '.join(h for _, h in COLUMNS)
    + ' | ref. best epoch | minutes |',
    '|' + '---|' * (len(COLUMNS) + 5),
  ]
  for key, c in sorted(cells.items()):
    cls, seed = key.split('/')
    lines.append(
      f'| {cls} | {seed} | {c["score_kind"]} | '
      + ' | '.join(f'{c[k]:.3f}' if k in c else '-' for k, _ in COLUMNS)
      + f' | {c["reference_best_epoch"]} | {c["seconds"] / 60:.1f} |'
    )
  if cells:
    lines.append(_mean_row(cells))
  lines += [
    '',
    'Per-epoch AUROC (eval-mode BN: paper score, latent k-NN; reference protocol '
    '(our emulation); official code):',
    '',
  ]
  fmt = lambda v: ' '.join(f'{x:.3f}' for x in v)  # noqa: E731
  for key, c in sorted(cells.items()):
    parts = [f'paper [{fmt(c["curve_paper"])}]']
    if 'curve_knn' in c:
      parts.append(f'latent k-NN [{fmt(c["curve_knn"])}]')
    parts.append(f'reference [{fmt(c["curve_reference"])}]')
    if 'official_curve' in c:
      parts.append(f'official [{fmt(c["official_curve"])}]')
    lines.append(f'- {key}: ' + '; '.join(parts))
  (out / 'quality.md').write_text('\n'.join(lines) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--classes', default='0,1,2,3,4,5,6,7,8,9')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--set', action='append', default=[], help='key=value override')
  parser.add_argument('--dataset_path', default='', help='sets config.dataset.path (arrays)')
  parser.add_argument(
    '--official', default='', help="reference_run.py's JSON (default: OUT/official.json)"
  )
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
  parser.add_argument(
    '--runs',
    default=str(ROOT / 'runs' / 'quality'),
    help='workdirs of the cells (checkpoints; not committed)',
  )
  parser.add_argument(
    '--summarise_only',
    action='store_true',
    help='train nothing: add missing diagnostics to finished cells, rewrite tables',
  )
  args = parser.parse_args()
  # Paths are relative to where the command runs; configs are imported from ROOT.
  out, runs = pathlib.Path(args.out).resolve(), pathlib.Path(args.runs).resolve()
  official_file = pathlib.Path(args.official).resolve() if args.official else out / 'official.json'
  overrides = list(args.set)
  if args.dataset_path:
    overrides.append(f'dataset.path={os.path.abspath(args.dataset_path)}')
  os.chdir(ROOT)
  out.mkdir(parents=True, exist_ok=True)
  done_file = out / 'quality.json'
  stored = json.loads(done_file.read_text()) if done_file.exists() else {}
  cells = stored.get('cells', {})
  header = stored.get('setup') or f'config={args.config} overrides={overrides or "none"}'
  official = json.loads(official_file.read_text())['classes'] if official_file.exists() else {}
  for seed in map(int, args.seeds.split(',')):
    for cls in args.classes.split(','):
      key = f'{cls}/{seed}'
      workdir = runs / f'class{cls}_seed{seed}'
      if key in cells:
        if 'reference_shuffled_auroc' not in cells[key] and workdir.exists():
          cells[key]['reference_shuffled_auroc'] = shuffled_reference_auroc(workdir)
        fill_score_columns(cells[key], workdir)
        print(f'{key}: done, skipped')
        continue
      if args.summarise_only:
        continue
      config = build_config(args.config, overrides, cls, seed)
      cells[key] = {**run_cell(config, workdir), 'commit': provenance()['commit']}
      cells[key]['reference_shuffled_auroc'] = shuffled_reference_auroc(workdir)
      fill_score_columns(cells[key], workdir)
      add_external_columns(cells, official)
      write_tables(cells, out, header)
      print(key, {k: v for k, v in cells[key].items() if not k.startswith('curve')})
  add_external_columns(cells, official)
  write_tables(cells, out, header)
  print((out / 'quality.md').read_text())


if __name__ == '__main__':
  main()
