"""Detection quality per abnormal class: our protocol beside the reference's, one run each.

For every (abnormal class, seed) cell it trains with the given config (with
`eval_protocol='reference'`, which additionally scores the test set the reference's way after
every epoch without touching our running statistics) and records:
  - ours_last: AUROC / AP of the run's score (config.score_kind: latent k-NN by
    default, or the paper's) with eval-mode BatchNorm, model of the last epoch;
  - ours_val_selected: AUROC of the epoch with the lowest mean validation-normal score
    (selection on held-out normals only);
  - paper_last / knn_last: AUROC of the paper's score and of the latent k-NN score of
    the last epoch's model (whichever the run did not report is computed afterwards
    from its final checkpoint, the bank from its training normals);
  - pixel_knn: a baseline without any network, the same k-NN (cosine, k=5) on raw
    pixels of the training normals;
  - reference_max: the reference's number, max over epochs of its test AUROC (BatchNorm
    in training mode, normal-first batches of 64; model selection on the test set);
  - reference_shuffled: the reference's evaluation (train-mode BatchNorm, batches of 64)
    of the last epoch's model on *shuffled* test batches: a diagnostic that separates
    what train-mode BatchNorm gains from the normal-first batch order (each batch then
    holds one class, and its statistics tell the classes apart);
  - the per-epoch curves of both.
Finished cells are skipped (their JSON exists); an interrupted cell resumes from its
checkpoint. Writes benchmarks/results/quality.json and quality.md.

    python benchmarks/quality.py --config=configs/demo.py --classes=0,1,2 --seeds=0 \
        --set model.ngf=64 --set model.ndf=64 --set num_epochs=15
"""

import argparse
import importlib
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skipganomaly_jax import (  # noqa: E402
  api,
  evaluation,
  input_pipeline,
  metrics,
  scoring,
  train,
)
from skipganomaly_jax.models import ModelSpec  # noqa: E402


def build_config(config_path: str, overrides: list[str], abnormal: str, seed: int):
  """The config of one cell: the file's config, the overrides, class, seed, protocol."""
  module = importlib.import_module(config_path.replace('/', '.').removesuffix('.py'))
  config = module.get_config()
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
    'ours_last_auroc': history[-1]['auroc'],
    'ours_last_ap': history[-1]['average_precision'],
    'ours_val_selected_auroc': best_val['auroc'],
    'ours_val_selected_epoch': best_val['epoch'],
    'reference_max_auroc': max(ref),
    'reference_best_epoch': int(np.argmax(ref)) + 1,
    'curve_ours': [r['auroc'] for r in history],
    'curve_reference': ref,
    'seconds': seconds,
  }


def shuffled_reference_auroc(workdir: pathlib.Path, seeds=(0, 1, 2)) -> float:
  """Mean AUROC of the reference's train-mode-BN scoring on shuffled test batches."""
  params, config, _ = api.load(str(workdir))
  spec = ModelSpec.from_variables(params)
  splits = input_pipeline.load_splits(config)
  aurocs = []
  for seed in seeds:
    perm = np.random.default_rng(seed).permutation(len(splits.test))
    scores = np.empty(len(perm))
    scores[perm] = evaluation.reference_protocol_scores(
      params, splits.test[perm], spec, config.score_lambda
    )
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
  if cell['score_kind'] == 'latent_knn':
    cell.setdefault('knn_last_auroc', cell['ours_last_auroc'])
  if 'knn_last_auroc' in cell and 'pixel_knn_auroc' in cell or not workdir.exists():
    return
  params, config, _ = api.load(str(workdir))
  splits = input_pipeline.load_splits(config)
  if 'knn_last_auroc' not in cell:
    no_bank = {k: v for k, v in params.items() if k != 'knn_bank'}
    bank = scoring.normalise_codes(scoring.score_details(no_bank, splits.train)['code'])
    scores = scoring.score_details({**no_bank, 'knn_bank': bank}, splits.test)['score']
    cell['knn_last_auroc'] = metrics.auroc(splits.test_labels, np.asarray(scores))
  flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
  pixel = scoring.knn_distance(flat(splits.test), scoring.normalise_codes(flat(splits.train)))
  cell['pixel_knn_auroc'] = metrics.auroc(splits.test_labels, np.asarray(pixel))


def write_tables(cells: dict, out: pathlib.Path, header: str) -> None:
  """quality.json and a markdown table with means."""
  (out / 'quality.json').write_text(json.dumps({'setup': header, 'cells': cells}, indent=2))
  cols = (
    'knn_last_auroc',
    'paper_last_auroc',
    'ours_last_ap',
    'ours_val_selected_auroc',
    'reference_max_auroc',
    'reference_shuffled_auroc',
    'pixel_knn_auroc',
  )
  lines = [
    f'Setup: {header}',
    '',
    '| abnormal | seed | run score | ours, latent k-NN score: AUROC (last) | ours, paper '
    'score: AUROC (last) | AP (last, run score) | AUROC (val-selected, run score) | '
    'reference protocol AUROC (max over epochs) | reference scoring, shuffled batches '
    '(last epoch) | baseline: pixel k-NN | ref. best epoch | minutes |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for key, c in sorted(cells.items()):
    cls, seed = key.split('/')
    lines.append(
      f'| {cls} | {seed} | {c["score_kind"]} | '
      + ' | '.join(f'{c.get(k, float("nan")):.3f}' for k in cols)
      + f' | {c["reference_best_epoch"]} | {c["seconds"] / 60:.1f} |'
    )
  if cells:
    means = [np.mean([c.get(k, np.nan) for c in cells.values()]) for k in cols]
    lines.append('| **mean** | | | ' + ' | '.join(f'**{m:.3f}**' for m in means) + ' | | |')
  lines += ['', 'Per-epoch AUROC (eval-mode BN: run score, paper score; reference protocol):', '']
  fmt = lambda v: ' '.join(f'{x:.3f}' for x in v)  # noqa: E731
  for key, c in sorted(cells.items()):
    lines.append(
      f'- {key}: {c["score_kind"]} [{fmt(c["curve_ours"])}]; paper [{fmt(c["curve_paper"])}]; '
      f'reference [{fmt(c["curve_reference"])}]'
    )
  (out / 'quality.md').write_text('\n'.join(lines) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--classes', default='0,1,2,3,4,5,6,7,8,9')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--set', action='append', default=[], help='key=value override')
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
  out, runs = pathlib.Path(args.out), pathlib.Path(args.runs)
  out.mkdir(parents=True, exist_ok=True)
  header = f'config={args.config} overrides={args.set or "none"}'
  done_file = out / 'quality.json'
  cells = json.loads(done_file.read_text())['cells'] if done_file.exists() else {}
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
      config = build_config(args.config, args.set, cls, seed)
      cells[key] = run_cell(config, workdir)
      cells[key]['reference_shuffled_auroc'] = shuffled_reference_auroc(workdir)
      fill_score_columns(cells[key], workdir)
      write_tables(cells, out, header)
      print(key, {k: v for k, v in cells[key].items() if not k.startswith('curve')})
  write_tables(cells, out, header)
  print((out / 'quality.md').read_text())


if __name__ == '__main__':
  os.chdir(ROOT)
  main()
