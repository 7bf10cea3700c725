"""An evaluation never uploads the weights per batch: it runs under a transfer guard.

`jax.transfer_guard('disallow')` refuses every implicit transfer: a host (numpy) copy of
the weights passed to a compiled function, a numpy batch handed to one, a Python scalar
argument, `np.asarray` of a device result. Only explicit ones pass: the `jax.device_put`
of each image batch (and of host weights, once) and the final `jax.device_get`. So an
evaluation (the dataset scores, the k-NN bank, the reference protocol, localisation's
maps and their scale) that passes here keeps the weights on the devices, and a
reintroduced per-batch host-params call fails it (the last test shows that the guard
does catch one on these very paths).
"""

import jax
import numpy as np
import pytest
from conftest import load_config, tiny

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data.splits import DataSplits
from skipganomaly_jax.parallel import make_mesh, replicate
from skipganomaly_jax.scoring import evaluation, localisation, placement
from skipganomaly_jax.scoring.scores import scoring_variables
from skipganomaly_jax.training import training_step


@pytest.fixture(scope='module')
def run():
  """(scorer, replicated variables, splits, specs): a tiny model, masks, the reference
  protocol, a map score with D's term ('rec+d'): every evaluation path at once."""
  config = tiny(load_config('default'))
  config.nc, config.eval_batch_size, config.eval_protocol = 1, 8, 'reference'
  config.score_kind, config.knn_bank_size = 'map_topk', 24
  config.localisation.map, config.localisation.sigma = 'rec+d', 1.0
  specs = config_lib.specs(config)
  step_spec = training_step.StepSpec.from_specs(specs)
  mesh = make_mesh()
  g, d = training_step.create_train_states(step_spec, jax.random.key(0))
  variables = replicate(scoring_variables(g, d), mesh)  # As training holds them.
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)  # noqa: E731
  labels = np.repeat(np.int32([0, 1]), 6)
  masks = np.zeros((12, 32, 32), np.uint8)
  masks[6:, 8:20, 10:22] = 1
  # As many validation as test images: their programs (maps, joins) are compiled once.
  splits = DataSplits(images(24), images(12), images(12), labels, 'x', test_masks=masks)
  return evaluation.make_scorer(step_spec.model, specs.score, mesh), variables, splits, specs


def evaluate(run) -> tuple[dict, localisation.MapScale]:
  """Training's evaluation of one epoch: bank, evaluation, then the maps' scale."""
  scorer, variables, splits, specs = run
  bank = evaluation.knn_bank(scorer, variables, splits.train, specs.score)
  report, _, _ = evaluation.evaluate(
    scorer, {**variables, 'knn_bank': bank}, splits, specs.score, specs.localisation
  )
  return report, localisation.map_scale(variables, splits.val, specs.localisation)


def test_evaluation_makes_no_implicit_transfer(run):
  with jax.transfer_guard('disallow'):
    report, scale = evaluate(run)
  for key in ('latent_knn_auroc', 'reference_protocol_auroc', 'pixel_auroc', 'pro', 'auroc'):
    assert 0.0 <= report[key] <= 1.0, (key, report)
  # The same numbers as from host copies of the weights (no guard): placement only.
  scorer, variables, splits, specs = run
  host = (scorer, jax.device_get(variables), splits, specs)
  want_report, want_scale = evaluate(host)
  assert report.keys() == want_report.keys()
  for key in ('paper_score_auroc', 'latent_knn_auroc', 'reference_protocol_auroc', 'pro'):
    assert report[key] == pytest.approx(want_report[key], abs=1e-6), key
  assert scale.unit == pytest.approx(want_scale.unit, rel=1e-6)


@pytest.mark.parametrize('path', ['scorer', 'local'])
def test_guard_catches_weights_uploaded_per_batch(run, monkeypatch, path):
  """Host weights handed to every batch's compiled call, as before the fix: refused."""
  if path == 'scorer':  # The dataset scorer (its scores and the bank).
    monkeypatch.setattr(evaluation.DatasetScorer, 'place', lambda self, v: jax.device_get(v))
  else:  # The reference protocol and localisation (one device's copy).
    monkeypatch.setattr(placement, 'on_one_device', lambda tree, device=None: jax.device_get(tree))
  with jax.transfer_guard('disallow'), pytest.raises(Exception, match='Disallowed host-to-device'):
    evaluate(run)
