"""Candidate anomaly scores of the same trained GANs, per abnormal class, on both datasets.

Reads the final checkpoint of every quality-run workdir (benchmarks/quality.py leaves
RUNS/class<c>_seed<s>/), rebuilds its split from the stored config, and computes every
candidate below on its test set: AUROC per class, means per dataset and over both. It
trains nothing. The candidates were fixed before any was measured on these runs:

  paper          0.9 * rec + 0.1 * lat (the paper's score; the baseline to beat)
  rec, lat       its two terms alone
  knn_g_code     cosine k-NN (k = 5) to the training normals on G's bottleneck code
                 (= score_kind 'latent_knn')
  knn_g_multi    the same on G's BatchNorm encoder levels (avg-pooled) and the code, each
                 level unit-normalised, concatenated
  knn_d_feat     k-NN on D's nz features f(x)
  knn_d_l1       k-NN on D's first BatchNorm layer (8x8 at isize 32), avg-pooled
  knn_d_l2       k-NN on D's last hidden layer (4x4), avg-pooled
  knn_d_l2_flat  k-NN on D's last hidden layer, flattened (keeps where things are)
  knn_d_multi    k-NN on [d_l1, d_l2, d_feat] pooled, each unit-normalised
  rec_d          reconstruction error in D's feature space: mean squared difference of
                 D's hidden layers 1 and 2 (and f) between x and G(x), layers equally
                 weighted (each divided by its mean over validation normals)
  ens_knn_gd     mean of the z-scores of knn_g_code and knn_d_feat
  ens_knn_all    mean z-score of knn_g_code, knn_g_multi, knn_d_multi, knn_d_l2_flat
  ens_knn_paper  mean z-score of knn_g_code and paper
  pixel_knn      k-NN on raw pixels (no network; a baseline)
Added after the list above had been measured on CIFAR dev (where none beat the paper
score), to test why: does the paper score rank by image complexity rather than content?
  complexity     mean squared difference of neighbouring pixels (no network; a baseline)
  rec_per_complexity  log rec - log complexity (the reconstruction error of an image
                 relative to how much detail it has)
  d_unreal       minus D's logit of x (how "unreal" D finds a test image)
The table also gives, per class, the Spearman rank correlation of the paper score with
complexity on the test set (`rho(paper, complexity)`).
z-scores use the mean and standard deviation of that score on the validation normals
(never the test set). Every network pass uses eval-mode BatchNorm. Each candidate is a
function of (variables, images) plus the training normals' bank, so whichever is chosen
can move into skipganomaly_jax/scoring/scores.py as a named score_kind.

    python benchmarks/score_candidates.py \
        --runs mnist5k=runs/quality --runs cifar10_dev=runs/quality_cifar10_dev \
        --out benchmarks/results/score_candidates
"""

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skipganomaly_jax.data import input_pipeline  # noqa: E402
from skipganomaly_jax.deploy import trained_run  # noqa: E402
from skipganomaly_jax.nets.models import ModelSpec  # noqa: E402
from skipganomaly_jax.scoring import metrics  # noqa: E402
from skipganomaly_jax.scoring.scores import (  # noqa: E402
  knn_distance,  # noqa: E402
  normalise_codes,
  score_details,
)

CHUNK = 256
KNN = ('g_code', 'g_multi', 'd_feat', 'd_l1', 'd_l2', 'd_l2_flat', 'd_multi')
ENSEMBLES = {
  'ens_knn_gd': ('knn_g_code', 'knn_d_feat'),
  'ens_knn_all': ('knn_g_code', 'knn_g_multi', 'knn_d_multi', 'knn_d_l2_flat'),
  'ens_knn_paper': ('knn_g_code', 'paper'),
}
CANDIDATES = (
  'paper',
  'rec',
  'lat',
  *(f'knn_{k}' for k in KNN),
  'rec_d',
  *ENSEMBLES,
  'pixel_knn',
  'complexity',
  'rec_per_complexity',
  'd_unreal',
)
BASELINES = ('pixel_knn', 'complexity')
COLUMNS = (*CANDIDATES, 'rho_paper_complexity')  # The last is a diagnostic, not a score.


def _top_level(module, method_name) -> bool:
  return method_name == '__call__' and len(module.scope.path) == 1


def _unit(v):
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _d_layers(spec, variables, x):
  """D's hidden activations (after LeakyReLU), features and logits, eval-mode BatchNorm."""
  (logits, _), state = spec.discriminator().apply(
    variables, x, train=False, capture_intermediates=_top_level, mutable=['intermediates']
  )
  inter = {k: v['__call__'][0] for k, v in state['intermediates'].items()}
  hidden = sorted(k for k in inter if k.startswith('bn_'))  # bn_1, bn_2 at isize 32.
  acts = [jax.nn.leaky_relu(inter[k], 0.2) for k in hidden]
  return acts[0], acts[-1], inter['features'].reshape(x.shape[0], -1), logits


def complexity(x):
  """Mean squared difference of vertically and horizontally neighbouring pixels."""
  dy = jnp.mean(jnp.square(x[:, 1:] - x[:, :-1]), axis=(1, 2, 3))
  return dy + jnp.mean(jnp.square(x[:, :, 1:] - x[:, :, :-1]), axis=(1, 2, 3))


@jax.jit
def _features(variables, x):
  """Per-image features and terms of one batch (float32 [-1, 1] images)."""
  spec = ModelSpec.from_variables(variables)
  x_hat, state = spec.generator().apply(
    variables['generator'],
    x,
    train=False,
    capture_intermediates=_top_level,
    mutable=['intermediates'],
  )
  inter = {k: v['__call__'][0] for k, v in state['intermediates'].items()}
  code = inter[f'down_{int(np.log2(spec.isize)) - 1}'].reshape(x.shape[0], -1)
  enc = [inter[k].mean(axis=(1, 2)) for k in sorted(inter) if k.startswith('down_bn_')]
  l1, l2, feat, logits = _d_layers(spec, variables['discriminator'], x)
  l1_hat, l2_hat, feat_hat, _ = _d_layers(spec, variables['discriminator'], x_hat)
  pool = lambda a: a.mean(axis=(1, 2))  # noqa: E731
  sq = lambda a, b: jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))  # noqa: E731
  rec, lat, detail = sq(x, x_hat), sq(feat, feat_hat), complexity(x)
  return {
    'paper': 0.9 * rec + 0.1 * lat,
    'rec': rec,
    'lat': lat,
    'rec_d_1': sq(l1, l1_hat),
    'rec_d_2': sq(l2, l2_hat),
    'g_code': code,
    'g_multi': jnp.concatenate([_unit(e) for e in enc] + [_unit(code)], axis=-1),
    'd_feat': feat,
    'd_l1': pool(l1),
    'd_l2': pool(l2),
    'd_l2_flat': l2.reshape(x.shape[0], -1),
    'd_multi': jnp.concatenate([_unit(pool(l1)), _unit(pool(l2)), _unit(feat)], axis=-1),
    'complexity': detail,
    'rec_per_complexity': jnp.log(rec + 1e-12) - jnp.log(detail + 1e-12),
    'd_unreal': -logits,
  }


def features(variables, images: np.ndarray) -> dict:
  """`_features` of uint8 images, in padded chunks of CHUNK; numpy arrays."""
  parts = []
  for start in range(0, len(images), CHUNK):
    chunk = input_pipeline.to_float(images[start : start + CHUNK])
    n = len(chunk)
    padded = np.zeros((CHUNK, *chunk.shape[1:]), np.float32)
    padded[:n] = chunk
    parts.append({k: np.asarray(v)[:n] for k, v in _features(variables, padded).items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def candidate_scores(variables, splits) -> dict:
  """Every candidate's test scores (dict name -> (N_test,))."""
  train, val, test = (features(variables, s) for s in (splits.train, splits.val, splits.test))
  out = {'val': {}, 'test': {}}
  for name, part in (('val', val), ('test', test)):
    for key in ('paper', 'rec', 'lat', 'complexity', 'rec_per_complexity', 'd_unreal'):
      out[name][key] = part[key]
    for key in KNN:
      bank = normalise_codes(train[key])
      out[name][f'knn_{key}'] = np.asarray(knn_distance(part[key], bank))
  scale = {k: val[k].mean() + 1e-12 for k in ('rec_d_1', 'rec_d_2', 'lat')}
  for name, part in (('val', val), ('test', test)):
    out[name]['rec_d'] = sum(part[k] / scale[k] for k in scale)
  for ens, members in ENSEMBLES.items():
    z = lambda v, m: (v - out['val'][m].mean()) / (out['val'][m].std() + 1e-12)  # noqa: E731
    out['test'][ens] = np.mean([z(out['test'][m], m) for m in members], axis=0)
  flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
  pixel_bank = normalise_codes(flat(splits.train))
  out['test']['pixel_knn'] = np.asarray(knn_distance(flat(splits.test), pixel_bank))
  return out['test']


def evaluate_workdir(workdir: pathlib.Path) -> dict:
  """AUROC of every candidate for one run's final checkpoint."""
  model = trained_run.restore(str(workdir))
  params = {k: v for k, v in model.params.items() if k != 'knn_bank'}
  splits = input_pipeline.load_splits(model.specs.data)
  scores = candidate_scores(params, splits)
  # Self-check against the package's own scorer: the intermediates read here must give
  # its paper score and its latent k-NN score.
  bank = normalise_codes(score_details(params, splits.train)['code'])
  ref = score_details({**params, 'knn_bank': bank}, splits.test)
  np.testing.assert_allclose(scores['paper'], ref['paper_score'], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(scores['knn_g_code'], ref['score'], rtol=1e-3, atol=1e-6)
  row = {name: metrics.auroc(splits.test_labels, scores[name]) for name in CANDIDATES}
  row['rho_paper_complexity'] = spearman(scores['paper'], scores['complexity'])
  return row


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (no ties in continuous scores)."""
  ra, rb = (np.argsort(np.argsort(v)).astype(np.float64) for v in (a, b))
  return float(np.corrcoef(ra, rb)[0, 1])


def write_tables(results: dict, out: pathlib.Path) -> None:
  """JSON and a markdown table: per class, per-dataset means, mean of the dataset means."""
  out.mkdir(parents=True, exist_ok=True)
  written = {**provenance(), **results}  # Top level: commit, command, then one key per dataset.
  (out / 'score_candidates.json').write_text(json.dumps(written, indent=2))
  head = '| dataset | class | ' + ' | '.join(COLUMNS) + ' |'
  lines = [head, '|' + '---|' * (len(COLUMNS) + 2)]
  means = {}
  for dataset, cells in results.items():
    for cls, row in sorted(cells.items()):
      lines.append(f'| {dataset} | {cls} | ' + ' | '.join(f'{row[c]:.3f}' for c in COLUMNS) + ' |')
    means[dataset] = {c: float(np.mean([r[c] for r in cells.values()])) for c in COLUMNS}
    lines.append(
      f'| **{dataset} mean** ({len(cells)}) | | '
      + ' | '.join(f'**{means[dataset][c]:.3f}**' for c in COLUMNS)
      + ' |'
    )
  if len(means) > 1:
    both = {c: float(np.mean([m[c] for m in means.values()])) for c in COLUMNS}
    lines.append(
      '| **mean of the dataset means** | | '
      + ' | '.join(f'**{both[c]:.3f}**' for c in COLUMNS)
      + ' |'
    )
  winners = [c for c in CANDIDATES[1:] if all(m[c] > m['paper'] for m in means.values())]
  lines.append(
    f'\nAbove the paper score on every dataset mean ({", ".join(means)}): '
    + (', '.join(winners) if winners else 'none')
    + '.'
  )
  (out / 'score_candidates.md').write_text(
    __doc__.split('\n\n')[1] + '\n\n' + '\n'.join(lines) + '\n'
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--runs', action='append', required=True, help='DATASET=RUNS_DIR (holding class*_seed*/)'
  )
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'score_candidates'))
  args = parser.parse_args()
  out = pathlib.Path(args.out).resolve()
  dirs = {}
  for item in args.runs:
    dataset, path = item.split('=', 1)
    dirs[dataset] = pathlib.Path(path).resolve()
  os.chdir(ROOT)
  results = {}
  for dataset, runs in dirs.items():
    workdirs = sorted(p for p in runs.glob('class*_seed*') if (p / 'checkpoints').is_dir())
    if not workdirs:
      raise FileNotFoundError(f'No class*_seed*/checkpoints under {runs}: run quality.py first.')
    results[dataset] = {}
    for workdir in workdirs:
      cls = workdir.name.removeprefix('class')
      results[dataset][cls] = evaluate_workdir(workdir)
      print(dataset, cls, {k: round(v, 3) for k, v in results[dataset][cls].items()}, flush=True)
      write_tables(results, out)
  print((out / 'score_candidates.md').read_text())


if __name__ == '__main__':
  main()
