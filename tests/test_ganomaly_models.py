"""GANomaly networks: exact parameter counts, shapes, the weight port and parity at init.

Parity uses tests/data/ganomaly_parity_ngf8.npz: numbers from the GANomaly authors' own
PyTorch code (ngf=ndf=8, nz=10, isize 32, nc 3, batch 8, torch naming and NCHW layout):
the input `x0`, the initial state dicts `init/G/*` and `init/D/*`, and the outputs at
init on x0 in eval mode (`init_eval/*`) and train mode (`init_train/*`). We port the
weights through `ganomaly_weights` and run our modules. "Relative" below is
max |ours - ref| / max |ref| over an array: at init, eval-mode outputs are tiny (the
running statistics are still 0 and 1; G(x0) stays below 1e-6), so an absolute bound
would pass anything there.
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipganomaly_jax.nets import ganomaly_weights
from skipganomaly_jax.nets.ganomaly import (
  CodeConvTranspose,
  GanomalyDiscriminator,
  GanomalyGenerator,
)

FIXTURE = pathlib.Path(__file__).resolve().parent / 'data' / 'ganomaly_parity_ngf8.npz'
NGF, NZ = 8, 10
# float32 outputs: measured <= 1.0e-6 relative ('auto' and 'lax'; float32 ulp 6e-8).
FORWARD_RTOL = 1e-5
OUTPUTS = ('fake', 'latent_i', 'latent_o', 'pred_real', 'feat_real', 'score')


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_variables(module, isize: int, nc: int):
  x = jnp.zeros((1, isize, isize, nc))
  return jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))


# ---- Shapes and parameter counts -------------------------------------------------------


@pytest.mark.parametrize(
  'isize,nc,extra_layers,g_count,d_count',
  [
    (32, 3, 0, 3_206_528, 663_296),
    (32, 1, 0, 3_200_384, 661_248),
    (64, 3, 0, 10_729_856, 2_765_568),
    # One extra 3x3 conv + BatchNorm at width 64 in each of the three sub-networks of G
    # (9 * 64^2 + 2 * 64 = 36,992 each) and in D.
    (32, 3, 1, 3_317_504, 700_288),
  ],
)
def test_parameter_counts_equal_authors(isize, nc, extra_layers, g_count, d_count):
  """Defaults ngf = 64, nz = 100 (D's width is ngf, as in the authors' NetD)."""
  g = abstract_variables(GanomalyGenerator(isize, nc, extra_layers=extra_layers), isize, nc)
  d = abstract_variables(GanomalyDiscriminator(isize, nc, extra_layers=extra_layers), isize, nc)
  assert count(g['params']) == g_count
  assert count(d['params']) == d_count


@pytest.mark.parametrize('extra_layers', [0, 1])
@pytest.mark.parametrize('isize', [32, 64])
@pytest.mark.parametrize('nc', [1, 3])
def test_output_shapes(isize, nc, extra_layers):
  ngf, nz, n = 4, 7, 3
  g = GanomalyGenerator(isize, nc, ngf, nz, extra_layers)
  d = GanomalyDiscriminator(isize, nc, ngf, extra_layers)
  x = jax.ShapeDtypeStruct((n, isize, isize, nc), jnp.float32)
  g_vars, d_vars = abstract_variables(g, isize, nc), abstract_variables(d, isize, nc)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  for train in (False, True):
    kwargs = {'mutable': ['batch_stats']} if train else {}
    g_out = jax.eval_shape(lambda v, x, t=train, kw=kwargs: g.apply(v, x, train=t, **kw), g_vars, x)
    d_out = jax.eval_shape(lambda v, x, t=train, kw=kwargs: d.apply(v, x, train=t, **kw), d_vars, x)
    if train:  # Every running statistic is updated, none added.
      (g_out, g_stats), (d_out, d_stats) = g_out, d_out
      assert shapes(g_stats['batch_stats']) == shapes(g_vars['batch_stats'])
      assert shapes(d_stats['batch_stats']) == shapes(d_vars['batch_stats'])
    fake, latent_i, latent_o = g_out
    assert fake.shape == (n, isize, isize, nc)
    assert latent_i.shape == latent_o.shape == (n, nz)
    logits, features = d_out
    assert logits.shape == (n,)
    assert features.shape == (n, 4 * 4 * ngf * isize // 8)  # D's last hidden layer, 4x4.
    assert {a.dtype for a in (fake, latent_i, latent_o, logits, features)} == {np.dtype(np.float32)}


def test_generator_output_is_tanh_and_codes_feed_back():
  """G's output is in (-1, 1) and encoder2 reads it: its code depends on the decoder."""
  g = GanomalyGenerator(32, 3, 4, 5)
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  variables = g.init(jax.random.key(1), x, train=False)
  (fake, latent_i, latent_o), _ = g.apply(variables, x, train=True, mutable=['batch_stats'])
  assert float(jnp.max(jnp.abs(fake))) < 1.0
  variables['params']['decoder']['final']['kernel'] *= 2.0
  (fake2, latent_i2, latent_o2), _ = g.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(latent_i, latent_i2)
  assert float(jnp.max(jnp.abs(latent_o - latent_o2))) > 1e-4


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  g, d = (
    GanomalyGenerator(32, 1, 4, 5, dtype=jnp.bfloat16),
    GanomalyDiscriminator(32, 1, 4, dtype=jnp.bfloat16),
  )
  g_vars, d_vars = abstract_variables(g, 32, 1), abstract_variables(d, 32, 1)
  assert {a.dtype for a in jax.tree.leaves(g_vars)} == {np.dtype(np.float32)}
  x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
  outs = jax.eval_shape(lambda v, x: g.apply(v, x, train=False), g_vars, x)
  outs += jax.eval_shape(lambda v, x: d.apply(v, x, train=False), d_vars, x)
  assert {a.dtype for a in outs} == {np.dtype(np.float32)}


def test_code_conv_transpose_is_flax_conv_transpose_valid():
  """The decoder's first layer = `nn.ConvTranspose(F, (4, 4), padding='VALID')` on 1x1."""
  z = jax.random.normal(jax.random.key(0), (3, 1, 1, 5))
  ours = CodeConvTranspose(6)
  variables = ours.init(jax.random.key(1), z)
  flax_layer = nn.ConvTranspose(6, (4, 4), padding='VALID', use_bias=False)
  want = flax_layer.apply(variables, z)
  assert want.shape == (3, 4, 4, 6)
  np.testing.assert_allclose(ours.apply(variables, z), want, rtol=1e-6, atol=1e-7)


# ---- The weight port --------------------------------------------------------------------


def fake_state_dicts(generator, discriminator, seed: int = 0):
  """Random state dicts with every torch key and shape the port's tables list."""
  rng = np.random.default_rng(seed)
  g, d = generator, discriminator
  netg = {}
  tables = {
    'encoder1': ganomaly_weights.encoder_table(g.isize, g.nc, g.ngf, g.nz, g.extra_layers),
    'decoder': ganomaly_weights.decoder_table(g.isize, g.nc, g.ngf, g.nz, g.extra_layers),
    'encoder2': ganomaly_weights.encoder_table(g.isize, g.nc, g.ngf, g.nz, g.extra_layers),
  }
  for part, table in tables.items():
    for key, row in table.items():
      netg[f'{part}.main.{key}'] = rng.normal(size=row[3]).astype(np.float32)
  table = ganomaly_weights.discriminator_table(d.isize, d.nc, d.ngf, d.extra_layers)
  netd = {key: rng.normal(size=row[3]).astype(np.float32) for key, row in table.items()}
  return netg, netd


@pytest.mark.parametrize('isize,nc,extra_layers', [(32, 3, 0), (32, 1, 2), (64, 3, 1)])
def test_port_fills_every_variable(isize, nc, extra_layers):
  """The port's tables give exactly the modules' variables, shapes included."""
  g = GanomalyGenerator(isize, nc, 6, 5, extra_layers)
  d = GanomalyDiscriminator(isize, nc, 6, extra_layers)
  ported = ganomaly_weights.convert_state_dicts(*fake_state_dicts(g, d), g, d)
  for module, name in ((g, 'generator'), (d, 'discriminator')):
    want = jax.tree.map(jnp.shape, dict(abstract_variables(module, isize, nc)))
    assert jax.tree.map(np.shape, ported[name]) == want


def test_port_names_a_wrong_key_or_shape():
  g, d = GanomalyGenerator(32, 3, NGF, NZ), GanomalyDiscriminator(32, 3, NGF)
  netg, netd = fake_state_dicts(g, d)
  with pytest.raises(ValueError, match='initial-conv-3-8'):  # A model of nc 1 for nc 3 weights.
    ganomaly_weights.convert_generator(netg, GanomalyGenerator(32, 1, NGF, NZ))
  with pytest.raises(ValueError, match='outside encoder1, decoder, encoder2'):
    ganomaly_weights.convert_generator({**netg, 'extra.weight': np.zeros(1)}, g)
  netd['classifier.0.weight'] = np.zeros((1, 32, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r'classifier\.0\.weight.*\(1, 32, 4, 4\)'):
    ganomaly_weights.convert_discriminator(netd, d)


# ---- Parity with the authors' code at init ---------------------------------------------


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


def state_dict(ref, net: str) -> dict:
  start = f'init/{net}/'
  return {k[len(start) :]: v for k, v in ref.items() if k.startswith(start)}


def forward(ref, netg, netd, train: bool, conv_impl: str = 'auto') -> dict:
  """Our outputs on x0 from the given torch state dicts, in the fixture's layouts."""
  assert (int(ref['config/ngf']), int(ref['config/nz'])) == (NGF, NZ)
  g = GanomalyGenerator(32, 3, NGF, NZ, conv_impl=conv_impl)
  d = GanomalyDiscriminator(32, 3, NGF, conv_impl=conv_impl)
  variables = ganomaly_weights.convert_state_dicts(netg, netd, g, d)
  x0 = jnp.asarray(ref['x0'].transpose(0, 2, 3, 1))
  kwargs = {'mutable': ['batch_stats']} if train else {}
  g_out = g.apply(variables['generator'], x0, train=train, **kwargs)
  d_out = d.apply(variables['discriminator'], x0, train=train, **kwargs)
  (fake, latent_i, latent_o), (logits, features) = (g_out[0], d_out[0]) if train else (g_out, d_out)
  latent_i, latent_o = np.asarray(latent_i), np.asarray(latent_o)
  features = np.asarray(features)
  return {
    'fake': np.asarray(fake).transpose(0, 3, 1, 2),
    'latent_i': latent_i[:, :, None, None],
    'latent_o': latent_o[:, :, None, None],
    'pred_real': np.asarray(jax.nn.sigmoid(logits)),
    'feat_real': features.reshape(features.shape[0], 4, 4, -1).transpose(0, 3, 1, 2),
    'score': np.mean(np.square(latent_i - latent_o), axis=1),  # The authors' test().
  }


def relative_errors(ours: dict, ref, mode: str) -> dict:
  errors = {}
  for name in OUTPUTS:
    theirs = np.asarray(ref[f'{mode}/{name}'], np.float64)
    assert ours[name].shape == theirs.shape, (name, ours[name].shape, theirs.shape)
    diff = np.max(np.abs(np.asarray(ours[name], np.float64) - theirs))
    errors[name] = float(diff / np.max(np.abs(theirs)))
  return errors


def show(errors: dict) -> str:
  return ', '.join(f'{k}: {v:.3g}' for k, v in errors.items())


@pytest.mark.parametrize('conv_impl', ['auto', 'lax'])
@pytest.mark.parametrize('mode', ['init_eval', 'init_train'])
def test_outputs_equal_authors_at_init(ref, mode, conv_impl):
  """fake, latent_i, latent_o, D(x) (sigmoid), D's features and the score on x0."""
  ours = forward(ref, state_dict(ref, 'G'), state_dict(ref, 'D'), mode == 'init_train', conv_impl)
  errors = relative_errors(ours, ref, mode)
  assert max(errors.values()) < FORWARD_RTOL, show(errors)


def flip_back(weight):
  """A transposed conv's weight spatially flipped: the orientation the port must undo."""
  return np.ascontiguousarray(weight[:, :, ::-1, ::-1])


@pytest.mark.parametrize(
  'key,change',
  [
    # One element of a decoder weight moved by one initial standard deviation.
    (
      'decoder.main.pyramid-32-16-convt.weight',
      lambda w: w + 0.02 * (np.arange(w.size) == 77).reshape(w.shape),
    ),
    # The code's 1x1 -> 4x4 transposed conv read in the wrong orientation.
    ('decoder.main.initial-10-32-convt.weight', flip_back),
  ],
)
def test_parity_check_catches_a_wrong_weight(ref, key, change):
  """The comparison above fails, in both modes, when one decoder weight is wrong."""
  netg = state_dict(ref, 'G')
  netg[key] = change(netg[key]).astype(np.float32)
  for mode in ('init_eval', 'init_train'):
    errors = relative_errors(
      forward(ref, netg, state_dict(ref, 'D'), mode == 'init_train'), ref, mode
    )
    assert errors['fake'] > 100 * FORWARD_RTOL, show(errors)
    assert errors['latent_o'] > 100 * FORWARD_RTOL, show(errors)
    assert errors['latent_i'] < FORWARD_RTOL, show(errors)  # encoder1 is untouched.
