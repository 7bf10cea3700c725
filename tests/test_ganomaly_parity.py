"""Numeric parity of the GANomaly training step with its authors' code (tests/data).

tests/data/ganomaly_parity_ngf8.npz holds the GANomaly authors' own numbers for a small
model (ngf=ndf=8, nz=10, isize 32, nc 3, batch 8, float32, NCHW, torch-named): its
initial weights, the losses and gradients of its first `optimize_params()` on x0, its
weights and BatchNorm running statistics after steps 1 and 3 (on x0, x1, x2), and its
eval-mode outputs on x0 after step 3. Their step: G forward; D on x and G(x) for D's
loss; D again on x and G(x) for G's adversarial (feature L2) term; G's Adam step, then
D's; D re-initialised when its loss is below 1e-5. So D's running statistics take four
EMA updates per step (x, G(x), x, G(x)).

We load the initial weights through `ganomaly_weights` and run our real jitted
`train_step` with config.model.name = 'ganomaly' (float32, conv_impl 'auto' = the fast
CPU conv path of real training), with the bounds of tests/test_reference_parity.py.
"Relative" is max |ours - ref| / max |ref| over an array. The last test breaks the step
on purpose (a wrong loss weight, a missing loss term, a skipped BatchNorm update) and
checks that the comparison then fails; run with -s to see each break's numbers.
"""

import json
import pathlib

import jax
import numpy as np
import parity_helpers
import pytest
from parity_helpers import nhwc, relative, show, state_dict, tree_relative

from skipganomaly_jax.nets import ganomaly_weights
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring import scores
from skipganomaly_jax.training import training_step

FIXTURE = pathlib.Path(__file__).resolve().parent / 'data' / 'ganomaly_parity_ngf8.npz'
SPEC = ModelSpec(isize=32, nc=3, ngf=8, ndf=8, nz=10, name='ganomaly')
# float32 outputs, losses, step-1 running statistics (float32 ulp 6e-8).
FORWARD_RTOL = 1e-5
# Gradients through the fast conv path (other summation orders than torch's).
GRAD_RTOL = 1e-5
# Running statistics after step 3, as tests/test_reference_parity.py (its weights then
# differ from torch's in a few entries whose gradient is ~1e-8; here measured 8e-7).
STEP3_RTOL = 1e-4
# The params test: mean |u - u_ref| per network and the share of entries off by > 0.01,
# with u = (param - init) / lr (see test_params_equal_reference).
PARAMS_MEAN_ABS, PARAMS_SHARE_OFF = 1e-3, 1e-4
OUTPUTS = ('fake', 'latent_i', 'latent_o', 'pred_real', 'feat_real', 'score')


@pytest.fixture(scope='module')
def ref():
  return parity_helpers.load_fixture(FIXTURE)


def variables(ref, prefix: str) -> dict:
  """The fixture's G and D weights at `prefix` ('init', 'step1', ...) as our variables."""
  return ganomaly_weights.convert_state_dicts(
    state_dict(ref, prefix, 'G'),
    state_dict(ref, prefix, 'D'),
    SPEC.generator(),
    SPEC.discriminator(),
  )


def parity_config():
  return parity_helpers.parity_config(SPEC)


def test_config_is_the_fixtures(ref):
  """The default weights are the authors' (stored with the fixture), the spec its model."""
  config = parity_config()
  assert (int(ref['config/ngf']), int(ref['config/ndf']), int(ref['config/nz'])) == (8, 8, 10)
  for ours, key in ((config.loss.w_adv, 'w_adv'), (config.loss.w_con, 'w_con')):
    assert ours == float(ref[f'config/{key}']), key
  assert config.loss.w_enc == float(ref['config/w_enc'])
  assert ModelSpec.from_config(config) == SPEC


def run_steps(ref, config):
  """Our real jitted train_step from the fixture's initial weights (`parity_helpers`)."""
  return parity_helpers.run_steps(ref, config, variables(ref, 'init'))


@pytest.fixture(scope='module')
def trained(ref):
  return run_steps(ref, parity_config())


# ---- The comparisons (shared by the parity tests and the deliberate breaks) ----------------


def loss_errors(ref, trained) -> dict:
  """Each loss of step 1. The fixture's terms are unweighted, its err_g weighted."""
  _, _, m = trained['step1']
  ours = {
    'err_g_adv': m['g_adv'],
    'err_g_con': m['g_con'],
    'err_g_enc': m['g_enc'],
    'err_g': m['g_loss'],
    'err_d_real': m['d_real_loss'],
    'err_d_fake': m['d_fake_loss'],
    'err_d': m['d_loss'],
  }
  return {k: relative(v, ref[f'step1_loss/{k}']) for k, v in ours.items()}


def reference_gradients(ref) -> dict:
  """The fixture's step-1 gradients in our layout (they transform like the weights)."""
  # The gradients replace the weights; the buffers only complete the state dicts.
  merged = {
    net: {**state_dict(ref, 'init', net), **state_dict(ref, 'step1_grad', net)}
    for net in ('G', 'D')
  }
  ported = ganomaly_weights.convert_state_dicts(
    merged['G'], merged['D'], SPEC.generator(), SPEC.discriminator()
  )
  return {k: v['params'] for k, v in ported.items()}


def gradient_errors(ref, trained, config) -> dict:
  """G's gradient of L_G and D's of L_D, from our real step's Adam state: after one step
  Adam's first moment is exactly (1 - b1) * g (b1 = 0.5, no rounding)."""
  g, d, _ = trained['step1']
  b1 = config.optim.b1
  expected = reference_gradients(ref)
  errors = {}
  for key, state in (('generator', g), ('discriminator', d)):
    ours = parity_helpers.first_step_gradients(state, b1)
    errors.update({f'{key}{k}': v for k, v in tree_relative(ours, expected[key]).items()})
  return errors


def params_report(ref, trained, config, after: str) -> dict:
  """Per network: mean |u - u_ref| and the share of entries with |u - u_ref| > 0.01, for
  u = (param - init) / lr, the update in learning rates (`parity_helpers.params_report`)."""
  g, d, _ = trained[after]
  return parity_helpers.params_report(
    (g, d), variables(ref, 'init'), variables(ref, after), config.optim.lr
  )


def params_ok(report: dict) -> bool:
  return all(
    r['mean_abs'] < PARAMS_MEAN_ABS and r['share_off'] < PARAMS_SHARE_OFF for r in report.values()
  )


def statistics_errors(ref, trained, after: str) -> dict:
  g, d, _ = trained[after]
  return parity_helpers.statistics_errors(g, d, variables(ref, after))


def eval_outputs(variables_, x0) -> dict:
  """Eval-mode G(x0), codes, D(x0) (sigmoid), D's features and the score, torch layouts."""
  fake, latent_i, latent_o = SPEC.generator().apply(variables_['generator'], x0, train=False)
  logits, features = SPEC.discriminator().apply(variables_['discriminator'], x0, train=False)
  features = np.asarray(features)
  return {
    'fake': np.asarray(fake).transpose(0, 3, 1, 2),
    'latent_i': np.asarray(latent_i)[:, :, None, None],
    'latent_o': np.asarray(latent_o)[:, :, None, None],
    'pred_real': np.asarray(jax.nn.sigmoid(logits)),
    'feat_real': features.reshape(features.shape[0], 4, 4, -1).transpose(0, 3, 1, 2),
    # The paper score of score_fn: GANomaly's own, mean over the code of (z_i - z_o)^2.
    'score': scores.score_fn(variables_, x0),
  }


def step3_eval_errors(ref, trained) -> dict:
  g, d, _ = trained['step3']
  ours = eval_outputs(scores.scoring_variables(g, d), nhwc(ref['x0']))
  return {k: relative(ours[k], ref[f'step3_eval/{k}']) for k in OUTPUTS}


# ---- Step 1: losses and gradients -----------------------------------------------------------


def test_step1_losses_equal_reference(ref, trained):
  """adv (D-feature L2), con (L1), enc (code L2), err_g, both BCEs and err_d (their half
  sum). Measured: 1.9e-7 at most."""
  errors = loss_errors(ref, trained)
  assert max(errors.values()) < FORWARD_RTOL, show(errors)


def test_step1_gradients_equal_reference(ref, trained):
  """Measured: 2.2e-6 relative per leaf at most (float32, fast conv path)."""
  errors = gradient_errors(ref, trained, parity_config())
  assert max(errors.values()) < GRAD_RTOL, show(errors)


# ---- Params and running statistics after steps 1 and 3 ------------------------------------


@pytest.mark.parametrize('after', ['step1', 'step3'])
def test_params_equal_reference(ref, trained, after):
  """Each param's change from init in learning rates, u = (param - init) / lr, entry by
  entry (Adam's first step moves every entry with |g| >> 1e-8 by +-lr whatever the
  gradient's size, so the params themselves say little): mean |u - u_ref| < 1e-3 per
  network and fewer than 1e-4 of the entries off by more than 0.01, as for Skip-GANomaly
  (tests/test_reference_parity.py explains the entries whose gradient is ~1e-8).
  Measured: mean 6e-6 (step 1) and 1.4e-5 (step 3), no entry off by 0.01."""
  report = params_report(ref, trained, parity_config(), after)
  assert params_ok(report), str(report)


@pytest.mark.parametrize('after', ['step1', 'step3'])
def test_running_statistics_equal_reference(ref, trained, after):
  """Both networks' running mean and var after steps 1 and 3: G one EMA update per step,
  D four (x, G(x), x, G(x)), unbiased variance. Step 1 sees the same weights as the
  reference: 1e-5; step 3 sees weights that may differ in the few entries the params test
  allows: 1e-4. Measured: 2.4e-7 (step 1), 8.0e-7 (step 3)."""
  errors = statistics_errors(ref, trained, after)
  assert max(errors.values()) < (FORWARD_RTOL if after == 'step1' else STEP3_RTOL), show(errors)


def test_eval_outputs_after_step3_equal_reference(ref, trained):
  """Eval mode after our three steps: G(x0), both codes, D(x0), D's features and
  score_fn's GANomaly score, so the running statistics drive eval mode as torch's do.
  Measured: 1.2e-6 at most (latent_o)."""
  errors = step3_eval_errors(ref, trained)
  assert max(errors.values()) < FORWARD_RTOL, show(errors)


def test_score_fn_is_the_authors_score_at_init(ref):
  """score_fn on the imported initial weights: the authors' test() score (eval mode)."""
  ours = scores.score_details(variables(ref, 'init'), nhwc(ref['x0']))
  assert relative(ours['paper_score'], ref['init_eval/score']) < FORWARD_RTOL
  np.testing.assert_array_equal(ours['score'], ours['paper_score'])  # No k-NN bank.
  assert ours['code'].shape == (8, SPEC.nz)
  assert relative(ours['code'], ref['init_eval/latent_i'][:, :, 0, 0]) < FORWARD_RTOL


def test_running_statistics_take_four_updates(ref):
  """Says, from the authors' own numbers, how D's statistics move in one step: the EMA
  updates of x0 and G(x0), twice over (repeat_updates on two D forwards); the same two
  updates once miss the fixture by far more than the tolerance."""
  init = variables(ref, 'init')
  expected = variables(ref, 'step1')['discriminator']['batch_stats']
  x0, d_model = nhwc(ref['x0']), SPEC.discriminator()
  fake = SPEC.generator().apply(init['generator'], x0, train=True, mutable=['batch_stats'])[0][0]
  stats = init['discriminator']['batch_stats']
  for images in (x0, fake):
    d_vars = {'params': init['discriminator']['params'], 'batch_stats': stats}
    stats = d_model.apply(d_vars, images, train=True, mutable=['batch_stats'])[1]['batch_stats']
  four = tree_relative(
    training_step.repeat_updates(init['discriminator']['batch_stats'], stats), expected
  )
  two = tree_relative(stats, expected)
  assert max(four.values()) < FORWARD_RTOL, show(four)
  assert min(two.values()) > 100 * FORWARD_RTOL, show(two)


def test_repeat_updates_equals_sequential_updates():
  """(1 + m^2) s2 - m^2 s0 is s0 after updates a, b, a, b."""
  rng = np.random.default_rng(0)
  s0, a, b = (rng.normal(size=5) for _ in range(3))
  m = training_step.BN_MOMENTUM
  ema = lambda s, x: m * s + (1 - m) * x
  s2 = ema(ema(s0, a), b)
  np.testing.assert_allclose(
    training_step.repeat_updates(s0, s2), ema(ema(s2, a), b), rtol=1e-12, atol=1e-12
  )


# ---- Deliberate breaks: the comparison must fail ---------------------------------------------


def with_loss(**weights):
  def change(config, monkeypatch):
    del monkeypatch
    for name, value in weights.items():
      setattr(config.loss, name, value)

  return change


def skip_one_d_update(config, monkeypatch):
  """D's running statistics take three updates (x, G(x), x): the last G(x) one skipped."""
  del config
  real = training_step.ganomaly_losses

  def three_updates(loss, g_model, d_model, g_vars, d_vars, x):
    with monkeypatch.context() as patch:  # Traced inside: the two-update statistics.
      patch.setattr(training_step, 'repeat_updates', lambda before, after: after)
      g_loss, d_loss, g_stats, d_stats, metrics = real(loss, g_model, d_model, g_vars, d_vars, x)
    d_vars = {'params': d_vars['params'], 'batch_stats': d_stats}
    _, d_new = d_model.apply(d_vars, x, train=True, mutable=['batch_stats'])
    return g_loss, d_loss, g_stats, d_new['batch_stats'], metrics

  monkeypatch.setitem(training_step.MODEL_LOSSES, 'ganomaly', three_updates)


BREAKS = {
  # A wrong loss weight: the contextual weight 40 instead of the authors' 50.
  'w_con_40': with_loss(w_con=40.0),
  # A missing loss term: G's encoder loss left out.
  'no_enc_term': with_loss(w_enc=0.0),
  # One BatchNorm update skipped: D's running statistics take three EMA updates.
  'three_d_updates': skip_one_d_update,
}


@pytest.mark.parametrize('name', list(BREAKS))
def test_parity_check_catches_a_deliberate_break(ref, name, monkeypatch):
  """The comparisons above, on a step broken on purpose: the one that the break
  concerns fails. Prints every number (run with -s). Measured (bound in brackets):

  - w_con_40: losses 0.19 (1e-5), gradients 0.34 (1e-5), params step 3 mean |u - u_ref|
    0.15 with 86% of G's entries off (1e-3, 1e-4), statistics step 3 9.8e-3 (1e-4),
    eval after step 3 1.6e-2 (1e-5);
  - no_enc_term: losses 7.2e-3, gradients 1.16, params step 1 0.69 with 51% of G's
    entries off, statistics step 3 0.13, eval after step 3 0.11;
  - three_d_updates: losses, gradients and params pass (the statistics do not feed
    back into training), statistics 0.14 after step 1 (1e-5) and 0.37 after step 3,
    eval after step 3 0.21.
  """
  config = parity_config()
  BREAKS[name](config, monkeypatch)
  broken = run_steps(ref, config)
  numbers = {
    'losses_max': max(loss_errors(ref, broken).values()),
    'gradients_max': max(gradient_errors(ref, broken, config).values()),
    'params_step1': params_report(ref, broken, config, 'step1'),
    'params_step3': params_report(ref, broken, config, 'step3'),
    'statistics_step1_max': max(statistics_errors(ref, broken, 'step1').values()),
    'statistics_step3_max': max(statistics_errors(ref, broken, 'step3').values()),
    'step3_eval_max': max(step3_eval_errors(ref, broken).values()),
  }
  print(f'\nbreak {name}: {json.dumps(numbers, indent=1)}')
  fails = {
    'losses': numbers['losses_max'] >= FORWARD_RTOL,
    'gradients': numbers['gradients_max'] >= GRAD_RTOL,
    'params': not (params_ok(numbers['params_step1']) and params_ok(numbers['params_step3'])),
    'statistics': numbers['statistics_step1_max'] >= FORWARD_RTOL
    or numbers['statistics_step3_max'] >= STEP3_RTOL,
    'step3_eval': numbers['step3_eval_max'] >= FORWARD_RTOL,
  }
  concerned = {'w_con_40': 'losses', 'no_enc_term': 'gradients', 'three_d_updates': 'statistics'}
  assert fails[concerned[name]], (fails, numbers)
