"""Conv layer speed: `lax` vs the shape-chosen implementation ('auto'), per layer and whole G.

For every distinct conv / transposed conv of the models (read off the networks
themselves), times the jitted forward and forward+backward (value_and_grad of <y, ct>
w.r.t. input and kernel) with impl='lax' and impl='auto': median of --iters calls, inputs
cycling through fresh random sets, batch --batch, float32. Then the whole generator
(ModelSpec(isize=32, nc=3), default widths): forward (train=False) and value_and_grad of
an L1 loss w.r.t. its params (train=True), conv_impl 'lax' vs 'auto'. --ops also times
each method of the ops C, D, G (see `skipganomaly_jax.nets.layers`) the selection rule uses.

Usage: python benchmarks/conv_layers.py [--isize 32 64] [--iters 5] [--ops] [--no_model]
Writes benchmarks/results/conv_layers.json.
"""

import argparse
import json
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from provenance import provenance

from skipganomaly_jax.nets import layers
from skipganomaly_jax.nets.models import ModelSpec

_RESULTS = pathlib.Path(__file__).resolve().parent / 'results' / 'conv_layers.json'
_POOL = 3  # Random input sets per measurement: one for the warm-up call, then cycled.


def median_ms(fn, pool, iters: int, budget_s: float) -> float:
  """Median wall time (ms) of fn(*args) over args cycling through pool[1:], after pool[0].

  Runs `iters` calls, or fewer (at least 3) once they took longer than `budget_s`.
  """
  jax.block_until_ready(fn(*pool[0]))
  times, start = [], time.perf_counter()
  while len(times) < 3 or (len(times) < iters and time.perf_counter() - start < budget_s):
    args = pool[1 + len(times) % (len(pool) - 1)]
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1000 * float(np.median(times))


def model_layers(isize: int) -> dict:
  """{(kind, in size, c_in, c_out, k, s, p): ['G.down_0', ...]} for G's and D's conv layers."""
  spec, found, net_tag = ModelSpec(isize=isize, nc=3), {}, []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == '__call__' and isinstance(m, layers.Conv | layers.ConvTranspose):
      _, h, _, c_in = args[0].shape
      if isinstance(m, layers.Conv):
        key = ('conv', h, c_in, m.features, m.kernel_size, m.stride, m.padding)
      else:
        key = ('convT', h, c_in, m.features, 4, 2, 1)
      found.setdefault(key, []).append(f'{net_tag[-1]}{isize}.{m.name}')
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, isize, isize, 3), jnp.float32)
  for net, tag in ((spec.generator(), 'G'), (spec.discriminator(), 'D')):
    net_tag.append(tag)
    with nn.intercept_methods(record):
      jax.eval_shape(lambda x, net=net: net.init(jax.random.key(0), x, train=False), x)
  return found


def layer_fn(key, impl: str):
  """The layer's computation y = f(x, kernel) (no bias) with the given impl."""
  kind, _, _, _, _, s, p = key
  if kind == 'conv':
    return lambda x, w: layers.conv2d(x, w, s, p, impl)
  return lambda x, w: layers.conv_transpose2d(x, w, impl)


def layer_pool(key, batch: int, rng):
  """_POOL random (x, kernel ~ N(0, 0.02), output cotangent) sets for one layer."""
  _, h, c_in, c_out, k = key[:5]
  x = jax.ShapeDtypeStruct((batch, h, h, c_in), jnp.float32)
  w = jax.ShapeDtypeStruct((k, k, c_in, c_out), jnp.float32)
  y = jax.eval_shape(layer_fn(key, 'lax'), x, w)
  normal = lambda shape, std=1.0: jnp.asarray(std * rng.standard_normal(shape, np.float32))
  return [(normal(x.shape), normal(w.shape, 0.02), normal(y.shape)) for _ in range(_POOL)]


def time_layer(key, pool, impl: str, iters: int, budget_s: float) -> tuple[float, float]:
  """(forward ms, forward+backward ms) of one layer."""
  fn = layer_fn(key, impl)
  fwd = jax.jit(lambda x, w, ct: fn(x, w))
  loss = lambda x, w, ct: jnp.sum(fn(x, w) * ct)
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return median_ms(fwd, pool, iters, budget_s), median_ms(fwd_bwd, pool, iters, budget_s)


def describe(key) -> str:
  kind, h, c_in, c_out, k, s, p = key
  extra = '' if (k, s, p) == (4, 2, 1) else f' k{k}s{s}p{p}'
  return f'{kind} {c_in}->{c_out} @{h}{extra}'


def plan_of(key) -> str:
  """The 'auto' methods on CPU for C, D, G of a k4 s2 p1 layer, e.g. 'im2col/overlap/lax'."""
  kind, h, c_in, c_out, k, s, p = key
  if (k, s, p) != (4, 2, 1):
    return 'matmul' if (h + 2 * p - k) // s == 0 else 'lax'
  triple = (h, c_in) if kind == 'conv' else (2 * h, c_out)
  return '/'.join(layers.plan(*triple, 'auto', backend='cpu'))


def bench_layers(isizes, batch: int, iters: int, budget_s: float, rng) -> list[dict]:
  found = {}
  for isize in isizes:
    for key, users in model_layers(isize).items():
      found.setdefault(key, []).extend(users)
  header = f'{"layer":28s} {"plan (C/D/G)":24s} {"fwd lax":>9s} {"fwd auto":>9s} {"x":>6s}'
  print(header + f' {"f+b lax":>9s} {"f+b auto":>9s} {"x":>6s}', flush=True)
  rows = []
  for key in sorted(found, key=lambda k: (k[0], -k[1], k[2], k[3], k[4])):
    pool = layer_pool(key, batch, rng)
    lax_f, lax_fb = time_layer(key, pool, 'lax', iters, budget_s)
    auto_f, auto_fb = time_layer(key, pool, 'auto', iters, budget_s)
    row = dict(
      layer=describe(key),
      users=found[key],
      plan=plan_of(key),
      lax_fwd_ms=lax_f,
      auto_fwd_ms=auto_f,
      lax_fwd_bwd_ms=lax_fb,
      auto_fwd_bwd_ms=auto_fb,
    )
    rows.append(row)
    print(
      f'{row["layer"]:28s} {row["plan"]:24s} {lax_f:9.1f} {auto_f:9.1f} '
      f'{lax_f / auto_f:6.1f} {lax_fb:9.1f} {auto_fb:9.1f} {lax_fb / auto_fb:6.1f}',
      flush=True,
    )
  return rows


def bench_ops(keys, batch: int, iters: int, budget_s: float, rng) -> list[dict]:
  """Forward time of every method of C, D and G for each k4 s2 p1 conv triple."""
  triples = sorted(
    {
      (h, c_in, c_out) if kind == 'conv' else (2 * h, c_out, c_in)
      for kind, h, c_in, c_out, k, s, p in keys
      if (k, s, p) == (4, 2, 1)
    },
    key=lambda t: (-t[0], t[1], t[2]),
  )
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  rows = []
  for h, c_in, c_out in triples:
    pools = [
      (normal(batch, h, h, c_in), normal(4, 4, c_in, c_out), normal(batch, h // 2, h // 2, c_out))
      for _ in range(_POOL)
    ]
    row = {'conv': f'{c_in}->{c_out} @{h}', 'auto': layers.plan(h, c_in, 'auto', 'cpu')}
    for op, methods, pick in (
      ('C', layers.CONV_METHODS, lambda x, w, dy: (x, w)),
      ('D', layers.CONV_T_METHODS, lambda x, w, dy: (dy, w)),
      ('G', layers.KERNEL_GRAD_METHODS, lambda x, w, dy: (x, dy)),
    ):
      pool = [pick(*p) for p in pools]
      row[op] = {m: median_ms(jax.jit(fn), pool, iters, budget_s) for m, fn in methods.items()}
    rows.append(row)
    cells = ' '.join(
      f'{op}:' + ','.join(f'{m}={t:.1f}' for m, t in row[op].items()) for op in 'CDG'
    )
    print(f'{row["conv"]:18s} auto={"/".join(row["auto"]):22s} {cells}', flush=True)
  return rows


def random_variables(shapes, rng):
  """Variables of the given shapes as the reference initialises them (BN stats 0 / 1)."""

  def fill(path, a):
    name = path[-1].key
    if name == 'kernel':
      return jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32))
    if name in ('scale', 'var'):
      return jnp.ones(a.shape) + (0.02 * rng.standard_normal(a.shape) if name == 'scale' else 0)
    return jnp.zeros(a.shape)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def bench_generator(batch: int, iters: int, budget_s: float, rng) -> dict:
  """Whole G (isize 32, nc 3, default widths): forward and value_and_grad, lax vs auto."""
  xs = [
    jnp.asarray(rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)) for _ in range(_POOL)
  ]
  shapes = jax.eval_shape(ModelSpec(isize=32, nc=3).generator().init, jax.random.key(0), xs[0])
  variables = random_variables(shapes, rng)
  out = {}
  for impl in ('lax', 'auto'):
    g = ModelSpec(isize=32, nc=3, conv_impl=impl).generator()

    def loss(params, batch_stats, x, g=g):
      y, updates = g.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      return jnp.mean(jnp.abs(y - x)), updates

    fwd = jax.jit(lambda v, x, g=g: g.apply(v, x, train=False))
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    out[f'{impl}_fwd_ms'] = median_ms(fwd, [(variables, x) for x in xs], iters, budget_s)
    out[f'{impl}_value_and_grad_ms'] = median_ms(
      grad, [(variables['params'], variables['batch_stats'], x) for x in xs], iters, budget_s
    )
  print(
    f'G (isize 32, batch {batch}) forward: lax {out["lax_fwd_ms"]:.1f} ms, auto '
    f'{out["auto_fwd_ms"]:.1f} ms; value_and_grad: lax {out["lax_value_and_grad_ms"]:.1f} '
    f'ms, auto {out["auto_value_and_grad_ms"]:.1f} ms',
    flush=True,
  )
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--isize', type=int, nargs='+', default=[32])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--budget_s', type=float, default=3.0, help='per measurement, soft')
  parser.add_argument('--ops', action='store_true', help='also time every method of C, D, G')
  parser.add_argument('--no_model', action='store_true', help='skip the whole-G timing')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f'backend {jax.default_backend()}, batch {args.batch}, float32, median ms', flush=True)
  result = {
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'machine': platform.platform(),
    'batch': args.batch,
    **provenance(),
    'layers': bench_layers(args.isize, args.batch, args.iters, args.budget_s, rng),
  }
  if args.ops:
    keys = set()
    for isize in args.isize:
      keys |= set(model_layers(isize))
    result['ops'] = bench_ops(keys, args.batch, args.iters, args.budget_s, rng)
  if not args.no_model:
    result['generator'] = bench_generator(args.batch, args.iters, args.budget_s, rng)
  _RESULTS.parent.mkdir(parents=True, exist_ok=True)
  _RESULTS.write_text(json.dumps(result, indent=1) + '\n')
  print(f'wrote {_RESULTS}')


if __name__ == '__main__':
  main()
