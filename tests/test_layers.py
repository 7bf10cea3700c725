"""The conv layers: every implementation equals `lax` and flax.linen, values and gradients.

Shapes are those of the models at isize 32 and 64 (spatial sizes and the per-op method
choice as in the real networks), with small batch and channel counts.
"""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from skipganomaly_jax.nets import layers
from skipganomaly_jax.nets.models import Discriminator, Generator

RTOL = ATOL = 1e-5


def model_layers(isize, nc=3, ngf=8, ndf=8, nz=16):
  """(kind, input size, c_in, c_out, kernel, stride, padding, use_bias) of G's and D's convs."""
  levels = int(np.log2(isize))
  widths = [ngf * min(2**i, 8) for i in range(levels)]
  out = []
  for i in range(levels):
    out.append(('conv', isize >> i, nc if i == 0 else widths[i - 1], widths[i], 4, 2, 1, False))
  for i in range(levels):  # Decoder: up_i maps level i's output (size isize >> (i + 1)).
    c_in = widths[i] * (1 if i == levels - 1 else 2)
    c_out, bias = (nc, True) if i == 0 else (widths[i - 1], False)
    out.append(('convT', isize >> (i + 1), c_in, c_out, 4, 2, 1, bias))
  for i in range(levels - 2):  # D: down to 4x4.
    c_in = nc if i == 0 else ndf * 2 ** (i - 1)
    out.append(('conv', isize >> i, c_in, ndf * 2**i, 4, 2, 1, False))
  out.append(('conv', 4, ndf * 2 ** (levels - 3), nz, 4, 1, 0, False))  # D's 'features'.
  out.append(('conv', 1, nz, 1, 3, 1, 1, False))  # D's 'classifier'.
  return out


LAYERS = sorted(set(model_layers(32) + model_layers(64) + model_layers(32, nc=1)))


def conv_of(layer):
  """(input size, c_in) of the conv whose ops compute a k4 s2 p1 layer."""
  kind, h, c_in, c_out = layer[:4]
  return (h, c_in) if kind == 'conv' else (2 * h, c_out)


def signature(layer):
  """What can change the computation: kind, spatial size, k, s, p, bias and the plans."""
  kind, h, _, _, k, s, p, bias = layer
  if (k, s, p) != (4, 2, 1):
    return kind, h, k, s, p, bias
  plans = tuple(layers.plan(*conv_of(layer), impl, 'cpu') for impl in ('auto', 'fast'))
  return kind, h, bias, plans


# One layer (the smallest channels) per distinct signature: every spatial size of both
# models, each method of each op, at a test time that compiling bounds.
DISTINCT = sorted({signature(s): s for s in reversed(LAYERS)}.values())


def make(layer, impl, dtype=jnp.float32):
  """Our module and flax.linen's equivalent for one layer spec."""
  kind, _, _, c_out, k, s, p, bias = layer
  if kind == 'conv':
    ours = layers.Conv(c_out, k, s, p, use_bias=bias, dtype=dtype, impl=impl)
    ref = nn.Conv(c_out, (k, k), (s, s), [(p, p)] * 2, use_bias=bias)
  else:
    ours = layers.ConvTranspose(c_out, use_bias=bias, dtype=dtype, impl=impl)
    ref = nn.ConvTranspose(c_out, (4, 4), (2, 2), 'SAME', use_bias=bias)
  return ours, ref


def value_and_grads(module, params, x, ct):
  """Output and the gradients of <output, ct> w.r.t. the input and the parameters."""
  loss = lambda v, x: jnp.sum(module.apply({'params': v}, x).astype(jnp.float32) * ct)
  y = module.apply({'params': params}, x)
  return y, jax.grad(loss, argnums=(1, 0))(params, x)


def random_case(layer, seed, batch=3):
  """Fresh N(0, 1) input, parameters (of the module's shapes) and output cotangent."""
  _, h, c_in = layer[:3]
  rng = np.random.default_rng(seed)
  normal = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  x = normal((batch, h, h, c_in))
  ours = make(layer, 'lax')[0]
  params = jax.tree.map(lambda a: normal(a.shape), jax.eval_shape(ours.init, jax.random.key(0), x))
  y = jax.eval_shape(ours.apply, params, x)
  return x, params['params'], normal(y.shape)


@pytest.mark.parametrize('layer', DISTINCT, ids=lambda s: '{}@{}_{}-{}_k{}s{}p{}_b{:d}'.format(*s))
def test_layer_equals_lax_and_flax(layer):
  x, params, ct = random_case(layer, seed=zlib.crc32(repr(layer).encode()))
  # 'auto' everywhere; 'fast' (all non-lax methods) where compiling it is quick, which
  # covers each method; 'lax' (= the original module) at a few.
  impls = ('auto',) + (('fast',) if layer[1] <= 8 else ()) + (('lax',) if layer[1] == 4 else ())

  @jax.jit
  def run(params, x, ct):
    out = {impl: value_and_grads(make(layer, impl)[0], params, x, ct) for impl in impls}
    return out, value_and_grads(make(layer, 'lax')[1], params, x, ct)

  out, ref = run(params, x, ct)
  for impl, got in out.items():
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
      scale = float(jnp.abs(b).max())
      np.testing.assert_allclose(a / scale, b / scale, rtol=RTOL, atol=ATOL, err_msg=impl)


def test_param_trees_equal_flax():
  """Names, shapes and dtypes of every layer's parameters are flax.linen's (any impl, dtype)."""
  for layer in DISTINCT:
    x = jnp.zeros((1, layer[1], layer[1], layer[2]))
    trees = [
      jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(m.init, jax.random.key(0), x))
      for m in make(layer, 'auto', jnp.bfloat16) + make(layer, 'lax')
    ]
    assert trees[0] == trees[1] == trees[2], layer


def test_kernel_init_is_normal_002():
  ours = make(('convT', 2, 64, 32, 4, 2, 1, True), 'auto')[0]
  params = ours.init(jax.random.key(0), jnp.zeros((1, 2, 2, 64)))['params']
  assert params['kernel'].dtype == jnp.float32
  assert abs(float(params['kernel'].std()) - 0.02) < 0.002
  assert not np.any(params['bias'])


def test_every_method_is_exercised():
  """The layer list covers every method of every op under 'auto' and 'fast'."""
  ops = ('conv', 'conv_t', 'kernel_grad')
  used = {op: set() for op in ops}
  for layer in DISTINCT:
    if layer[4:7] == (4, 2, 1):
      for impl in ('auto', 'fast'):
        for op, method in zip(ops, layers.plan(*conv_of(layer), impl, 'cpu'), strict=True):
          used[op].add(method)
  assert used == {
    'conv': set(layers.CONV_METHODS),
    'conv_t': set(layers.CONV_T_METHODS),
    'kernel_grad': set(layers.KERNEL_GRAD_METHODS),
  }


def test_plan_is_lax_off_cpu_and_checks_impl():
  assert layers.plan(2, 512, 'auto', backend='gpu') is None
  assert layers.plan(2, 512, 'lax', backend='cpu') is None
  assert layers.plan(2, 512, 'auto', backend='cpu') == ('im2col', 'overlap', 'im2col')
  with pytest.raises(ValueError, match='impl'):
    layers.plan(2, 3, 'fastest')


def test_bfloat16_close_to_float32():
  """bf16 compute (params stay float32) of every method is close to float32 `lax`."""
  cases = [('conv', 4, 32, 64, 4, 2, 1, False), ('convT', 2, 128, 32, 4, 2, 1, False)]

  @jax.jit
  def run(args):
    out = {}
    for layer, (x, params, ct) in zip(cases, args, strict=True):
      out[layer, 'ref'] = value_and_grads(make(layer, 'lax')[0], params, x, ct)
      for impl in ('auto', 'fast'):
        out[layer, impl] = value_and_grads(make(layer, impl, jnp.bfloat16)[0], params, x, ct)
    return out

  out = run([random_case(layer, seed=7) for layer in cases])
  for layer in cases:
    want = jax.tree.leaves(out[layer, 'ref'])
    for impl in ('auto', 'fast'):
      got = jax.tree.leaves(out[layer, impl])
      assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32  # y; a param grad.
      for a, b in zip(got, want, strict=True):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a.astype(jnp.float32) / scale, b / scale, atol=3e-2)


def test_under_shard_map():
  """Batch-sharded, replicated kernel: the kernel gradient is summed over devices."""
  layer = ('convT', 2, 16, 8, 4, 2, 1, False)
  devices = jax.devices()
  x, params, ct = random_case(layer, seed=3, batch=2 * len(devices))
  mesh = Mesh(np.asarray(devices), ('b',))
  module = make(layer, 'fast')[0]

  def grads(params, x, ct):
    return jax.grad(lambda v: jnp.sum(module.apply({'params': v}, x) * ct))(params)

  sharded = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(P(), P('b'), P('b')), out_specs=P()))
  want = jax.grad(lambda v: jnp.sum(make(layer, 'lax')[0].apply({'params': v}, x) * ct))(params)
  got = sharded(params, x, ct)['kernel']
  np.testing.assert_allclose(got, want['kernel'], rtol=1e-4, atol=1e-4)


def random_variables(module, x, rng):
  """Random variables of module's shapes (cheaper than its jitted init); BN variances > 0."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)

  def fill(path, a):
    if path[-1].key == 'var':
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32)
    return jnp.asarray(0.2 * rng.normal(size=a.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_model_conv_impl_keeps_params_and_values():
  """G and D with conv_impl 'auto' / 'fast' have the variable trees and outputs of 'lax'."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  nets = [Generator(32, 3, ngf=4), Discriminator(32, 3, ndf=4, nz=8)]
  for net in nets:
    shapes = [
      jax.tree.map(jnp.shape, jax.eval_shape(net.clone(conv_impl=i).init, jax.random.key(0), x))
      for i in ('lax', 'auto', 'fast')
    ]
    assert shapes[0] == shapes[1] == shapes[2]
  variables = [random_variables(net, x, rng) for net in nets]

  @jax.jit
  def run(variables, x):
    return {
      (type(net).__name__, impl): net.clone(conv_impl=impl).apply(v, x, train=False)
      for net, v in zip(nets, variables, strict=True)
      for impl in ('lax', 'auto')
    }

  out = run(variables, x)
  for name in ('Generator', 'Discriminator'):
    got, want = jax.tree.leaves(out[name, 'auto']), jax.tree.leaves(out[name, 'lax'])
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
