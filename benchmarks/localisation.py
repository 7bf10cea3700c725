"""Localisation results on the seeded texture dataset: image AUROC, pixel AUROC and PRO.

For each texture (brick, grass, gravel; skipganomaly_jax/data/textures.py, generated if
missing), trains configs/textures.py (optionally shorter / narrower), then, from the final
checkpoint, scores every map variant (reconstruction only or + D features, Gaussian sigma,
max or top-1% mean) and a baseline without a network: the per-pixel squared deviation
from the mean training image, smoothed alike. Reports per texture and defect kind.

    python benchmarks/localisation.py            # 9-15 min per texture on 2 shared CPU cores
    python benchmarks/localisation.py --summarise_only --chosen=rec,1,map_max   # re-tabulate

Writes benchmarks/results/localisation.{json,md}.
"""

import argparse
import itertools
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import textures as textures_config  # noqa: E402
from skipganomaly_jax.data import input_pipeline, mvtec, textures  # noqa: E402
from skipganomaly_jax.deploy import trained_run as api  # noqa: E402
from skipganomaly_jax.scoring import localisation, metrics, pixel_metrics
from skipganomaly_jax.training import train

SIGMAS = (0.0, 1.0, 2.0, 4.0)
SCORES = localisation.MAP_SCORE_KINDS


def make_config(args, texture: str):
  config = textures_config.get_config()
  config.dataset.root, config.dataset.category = args.data, texture
  config.num_epochs, config.model.ngf, config.model.ndf = args.epochs, args.ngf, args.ngf
  config.model.drop_outer_skips = args.drop_outer_skips
  return config


def evaluate(maps, scores, splits, kinds) -> dict:
  """Overall and per-defect-kind image AUROC, pixel AUROC and PRO."""
  labels, masks = splits.test_labels, splits.test_masks
  out = {'all': {'image_auroc': metrics.auroc(labels, scores)}}
  out['all'].update(pixel_metrics.evaluate_pixels(maps, masks))
  for kind in sorted(set(kinds[labels == 1])):
    pick = (labels == 0) | (kinds == kind)
    out[kind] = {'image_auroc': metrics.auroc(labels[pick], scores[pick])}
    out[kind].update(pixel_metrics.evaluate_pixels(maps[pick], masks[pick]))
  return out


def variants(params, splits, kinds) -> list[dict]:
  """Every (map, sigma, score) variant of the trained model, and the baseline."""
  val = localisation.map_terms(params, splits.val, d_levels=2)
  test = localisation.map_terms(params, splits.test, d_levels=2)
  scale = localisation.term_scale(val)
  mean_image = input_pipeline.to_float(splits.train).mean(axis=0)
  baseline = {'rec': np.mean((input_pipeline.to_float(splits.test) - mean_image) ** 2, axis=-1)}
  rows = []
  for kind, sigma, score in itertools.product(('rec', 'rec+d', 'baseline'), SIGMAS, SCORES):
    settings = localisation.Settings(map='rec' if kind == 'baseline' else kind, sigma=sigma)
    maps = localisation.combine(baseline if kind == 'baseline' else test, settings, scale)
    result = evaluate(maps, localisation.image_scores(maps, score), splits, kinds)
    rows.append({'map': kind, 'sigma': sigma, 'score': score, 'results': result})
  return rows


def run_texture(args, texture: str) -> dict:
  config = make_config(args, texture)
  workdir = os.path.join(args.workdir, texture)
  start = time.perf_counter()
  report = train.train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - start
  model = api.restore(workdir)
  splits = input_pipeline.load_splits(model.specs.data)
  rows = variants(model.params, splits, mvtec.defect_kinds(splits))
  print(f'{texture}: trained + evaluated in {seconds:.0f} s; run report: {_brief(report)}')
  return {'texture': texture, 'train_eval_seconds': seconds, 'report': report, 'variants': rows}


def _brief(report: dict) -> str:
  keys = ('auroc', 'paper_score_auroc', 'pixel_auroc', 'pro', 'map_max_auroc', 'map_topk_auroc')
  return ', '.join(f'{k} {report[k]:.3f}' for k in keys if k in report)


def _find(rows, kind, sigma, score):
  return next(r for r in rows if (r['map'], r['sigma'], r['score']) == (kind, sigma, score))


def markdown(results: list[dict], chosen: tuple, args) -> str:
  """The per-texture/defect table (chosen map vs baseline) and the variant means."""
  lines = [
    f'Trained: configs/textures.py, {args.epochs} epochs, ngf=ndf={args.ngf}, '
    f'drop_outer_skips={args.drop_outer_skips}, seed 0; 64 px, 1 channel.',
    f'Map: {chosen[0]}, sigma {chosen[1]} px, image score {chosen[2]}; baseline: '
    f'(x - mean training image)^2, same sigma and score.',
    '',
    '| texture | defect | image AUROC | pixel AUROC | PRO | baseline image AUROC | '
    'baseline pixel AUROC | baseline PRO |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for res in results:
    ours = _find(res['variants'], *chosen)['results']
    base = _find(res['variants'], 'baseline', chosen[1], chosen[2])['results']
    for kind in ours:
      o, b = ours[kind], base[kind]
      lines.append(
        f'| {res["texture"]} | {kind} | {o["image_auroc"]:.3f} | {o["pixel_auroc"]:.3f} | '
        f'{o["pro"]:.3f} | {b["image_auroc"]:.3f} | {b["pixel_auroc"]:.3f} | {b["pro"]:.3f} |'
      )
  lines += [
    '',
    'Per run (the same trained models; map scores do not change training): '
    + '; '.join(
      f'{r["texture"]} {r["train_eval_seconds"] / 60:.1f} min (train + 15 evaluations), '
      f'paper score image AUROC {r["report"]["paper_score_auroc"]:.3f}'
      for r in results
    )
    + '.',
    'The map variant was chosen on these test numbers (the best mean pixel AUROC / PRO '
    'below); treat the texture numbers as a demonstration, not an untuned estimate.',
    '',
    'Map variants, mean over textures (all defects):',
    '',
    '| map | sigma | score | image AUROC | pixel AUROC | PRO |',
    '|---|---|---|---|---|---|',
  ]
  for kind, sigma, score in itertools.product(('rec', 'rec+d', 'baseline'), SIGMAS, SCORES):
    mean = {
      k: np.mean([_find(r['variants'], kind, sigma, score)['results']['all'][k] for r in results])
      for k in ('image_auroc', 'pixel_auroc', 'pro')
    }
    lines.append(
      f'| {kind} | {sigma:g} | {score} | {mean["image_auroc"]:.3f} | '
      f'{mean["pixel_auroc"]:.3f} | {mean["pro"]:.3f} |'
    )
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default=str(ROOT / 'data' / 'textures'))
  parser.add_argument('--textures', default=','.join(textures.TEXTURES))
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--ngf', type=int, default=32)
  parser.add_argument('--drop_outer_skips', type=int, default=0)
  parser.add_argument('--workdir', default='/tmp/skipganomaly_localisation')
  parser.add_argument('--chosen', default='rec+d,2,map_topk', help='map,sigma,score of the table')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'localisation'))
  parser.add_argument(
    '--summarise_only', action='store_true', help='rewrite the table from the JSON (--chosen)'
  )
  args = parser.parse_args()
  if args.summarise_only:
    stored = json.loads(pathlib.Path(args.out + '.json').read_text())
    results = stored['results']
    for key in ('epochs', 'ngf', 'drop_outer_skips'):
      setattr(args, key, stored['args'][key])
  else:
    jax.config.update('jax_compilation_cache_dir', '/tmp/skipganomaly_jax_cache')
    names = args.textures.split(',')
    for name in names:
      if not os.path.isdir(os.path.join(args.data, name)):
        print(textures.generate_texture(args.data, name))
    results = [run_texture(args, name) for name in names]
    pathlib.Path(args.out + '.json').write_text(
      json.dumps({'args': vars(args), **provenance(), 'results': results}, indent=1, default=float)
    )
  kind, sigma, score = args.chosen.split(',')
  table = markdown(results, (kind, float(sigma), score), args)
  pathlib.Path(args.out + '.md').write_text(table)
  print(table)


if __name__ == '__main__':
  main()
