"""4x4 convolution layers of Skip-GANomaly, with backend-aware implementations.

Both layers hold exactly the parameters of `flax.linen.Conv` / `flax.linen.ConvTranspose`
('kernel' of shape (kh, kw, in, out), optional 'bias'), so checkpoints and parameter
counts do not depend on which implementation computes them.

Why: XLA's CPU convolutions have slow paths at 1-4 pixel spatial sizes, and jax's own
gradient of `lax.conv_transpose` (an input-dilated conv) is slow on CPU at every size. So
on CPU ('auto') every k4 s2 p1 layer runs through a `custom_vjp` built from three ops of
the conv y = conv(x, w) (C_in -> C_out at input size H): `conv` itself, its transpose with
respect to the input `conv_t(dy, w)` and its kernel gradient `kernel_grad(x, dy)`.
Conv = conv (grads conv_t, kernel_grad); ConvTranspose(x, k) = conv_t(x, kT) (grads conv,
kernel_grad), kT = k flipped spatially, in/out swapped. Each op picks a method by shape at
trace time (rule from timing every method of each op: `benchmarks/conv_layers.py --ops`):

  conv: 'im2col' (patches + dot; a plain matmul when the output is 1x1) if H <= 8, else
     'lax'.
  conv_t: 'overlap' (one dot with all 16 taps + overlap-add; a matmul at 1x1 input) if
     H <= 2, 'subpixel' (4 output phases, each a 2x2 conv as patches + dot) if H == 4,
     else 'lax'.
  kernel_grad: 'im2col' (patches^T @ dy) if H <= 4, 'taps' (16 dots over the batch) if
     C_in <= 4, else 'lax' (jax's vjp of the lax conv).
  Other convs (D's 'features', 'classifier'): a matmul when the output is 1x1, else lax.

Per-layer timings of every plan (lax vs this module, forward and forward+backward) are
measured by benchmarks/conv_layers.py; the table is in docs/results.md.

'lax' forces plain `lax` ops with jax's autodiff (the reference; always used off CPU);
'fast' forces the custom_vjp with the best non-lax method of each op (for tests). A run
picks one with config.model.conv_impl ('lax' on CPU trains the accelerators' graph).
The custom_vjp supports reverse mode (jit, grad, shard_map, vmap) but not forward mode;
under shard_map its cotangents get their inputs' varying mesh axes (`_with_varying_axes_of`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from skipganomaly_jax.config import CONV_IMPLS

Dtype = Any

conv_init = nn.initializers.normal(stddev=0.02)

IMPLS = CONV_IMPLS  # config.model.conv_impl's values: 'auto', 'lax', 'fast'.
_DN = ('NHWC', 'HWIO', 'NHWC')
# Transposed conv 4x4, stride 2, padding (2, 2): output row 2a + p reads input rows a + d
# with kernel row k, for (d, k) in _PHASE_TAPS[p].
_PHASE_TAPS = (((-1, 0), (0, 2)), ((0, 1), (1, 3)))


def _dot(a, b):
  """`a @ b` over the last axis of a, accumulated in float32, returned in a's dtype."""
  return lax.dot_general(
    a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  ).astype(a.dtype)


def _transposed_kernel(w):
  """The kernel of the transposed op: flipped spatially, in/out channels swapped."""
  return w[::-1, ::-1].transpose(0, 1, 3, 2)


def _tap_range(k: int, stride: int, pad: int, size: int, out: int) -> tuple[int, int]:
  """The kernel taps [lo, hi) that read at least one input (not padding) position."""
  used = [i for i in range(k) if any(0 <= i + stride * o - pad < size for o in range(out))]
  return used[0], used[-1] + 1


def _im2col(x, k: int, stride: int, padding: int):
  """Patches of the taps that see the input: ((n, ho, wo, taps * c), (r0, r1, c0, c1)).

  Taps that only ever read padding are left out (at 1-2 pixel inputs most of them are).
  """
  n, h, w, c = x.shape
  ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
  r0, r1 = _tap_range(k, stride, padding, h, ho)
  c0, c1 = _tap_range(k, stride, padding, w, wo)
  lo_h, lo_w = max(0, padding - r0), max(0, padding - c0)
  if ho == wo == 1 and (r1 - r0, c1 - c0) == (h, w) and lo_h == lo_w == 0:
    return x.reshape(n, 1, 1, -1), (r0, r1, c0, c1)  # The kept taps cover the input.
  hi_h = max(0, r1 - 1 - padding + stride * (ho - 1) - (h - 1))
  hi_w = max(0, c1 - 1 - padding + stride * (wo - 1) - (w - 1))
  xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  taps = []
  for i in range(r0 - padding + lo_h, r1 - padding + lo_h):
    for j in range(c0 - padding + lo_w, c1 - padding + lo_w):
      end = (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c)
      taps.append(lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1)))
  return (jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]), (r0, r1, c0, c1)


def conv_lax(x, w, stride: int = 2, padding: int = 1):
  """conv by `lax.conv_general_dilated` (PyTorch Conv2d semantics, symmetric padding)."""
  return lax.conv_general_dilated(
    x, w, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DN
  )


def conv_im2col(x, w, stride: int = 2, padding: int = 1):
  """conv by patches + one dot (a plain matmul when the kept taps cover a 1x1 output)."""
  patches, (r0, r1, c0, c1) = _im2col(x, w.shape[0], stride, padding)
  return _dot(patches, w[r0:r1, c0:c1].reshape(-1, w.shape[-1]))


def conv_t_lax(dy, w):
  """conv_t (the k4 s2 p1 conv transposed w.r.t. its input) by `lax.conv_transpose`."""
  return lax.conv_transpose(
    dy, _transposed_kernel(w), (2, 2), [(2, 2), (2, 2)], dimension_numbers=_DN
  )


def _interleave(phases, n, h, w, f):
  """[[y00, y01], [y10, y11]] of (n, h, w, f) -> (n, 2h, 2w, f) with y[2a+p, 2b+q] = ypq."""
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
  return y.reshape(n, 2 * h, 2 * w, f)


def conv_t_overlap(dy, w):
  """conv_t by one dot with all 16 taps (the einsum form), then an overlap-add of slices."""
  kernel = _transposed_kernel(w)  # ConvTranspose orientation, (4, 4, in, out).
  n, h, wd, c = dy.shape
  f = kernel.shape[-1]
  if h == wd == 1:  # Only the taps (2, 1) x (2, 1) see the input: one matmul.
    wk = kernel[2:0:-1, 2:0:-1].transpose(2, 0, 1, 3).reshape(c, 4 * f)
    return _dot(dy.reshape(n, c), wk).reshape(n, 2, 2, f)
  z = _dot(dy, kernel.transpose(2, 0, 1, 3).reshape(c, 16 * f)).reshape(n, h, wd, 4, 4, f)
  z = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  phases = []
  for taps_r in _PHASE_TAPS:
    r = sum(z[:, 1 + d : 1 + d + h, :, kr] for d, kr in taps_r)  # (n, h, wd + 2, 4, f)
    phases.append(
      [sum(r[:, :, 1 + d : 1 + d + wd, kc] for d, kc in taps_c) for taps_c in _PHASE_TAPS]
    )
  return _interleave(phases, n, h, wd, f)


def conv_t_subpixel(dy, w):
  """conv_t as four output phases, each a 2x2 stride-1 conv by patches + dot (sub-pixel form)."""
  kernel = _transposed_kernel(w)
  n, h, wd, c = dy.shape
  f = kernel.shape[-1]
  xp = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  phases = []
  for taps_r in _PHASE_TAPS:
    row = []
    for taps_c in _PHASE_TAPS:
      taps = [(dr, kr, dc, kc) for dr, kr in taps_r for dc, kc in taps_c]
      patches = jnp.concatenate(
        [xp[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + wd] for dr, _, dc, _ in taps], axis=-1
      )
      wk = jnp.stack([kernel[kr, kc] for _, kr, _, kc in taps]).reshape(4 * c, f)
      row.append(_dot(patches, wk))
    phases.append(row)
  return _interleave(phases, n, h, wd, f)


def kernel_grad_lax(x, dy):
  """kernel_grad (gradient of the conv w.r.t. its 4x4 kernel) as jax's vjp of `lax` conv."""
  w0 = jnp.zeros((4, 4, x.shape[-1], dy.shape[-1]), x.dtype)
  return jax.vjp(lambda w: conv_lax(x, w), w0)[1](dy)[0]


def _contract_nhw(a, b):
  """Contraction of a and b over their (n, h, w) axes, float32 accumulation."""
  return lax.dot_general(
    a, b, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32
  ).astype(a.dtype)


def kernel_grad_im2col(x, dy):
  """kernel_grad as patches^T @ dy; kernel taps that only see padding get zeros."""
  patches, (r0, r1, c0, c1) = _im2col(x, 4, 2, 1)
  g = _contract_nhw(patches, dy).reshape(r1 - r0, c1 - c0, x.shape[-1], dy.shape[-1])
  return jnp.pad(g, ((r0, 4 - r1), (c0, 4 - c1), (0, 0), (0, 0)))


def kernel_grad_taps(x, dy):
  """kernel_grad as 16 separate contractions over the batch, one per kernel tap."""
  n, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  end = lambda i, j: (n, i + h - 1, j + wd - 1, c)
  return jnp.stack(
    [
      jnp.stack(
        [_contract_nhw(lax.slice(xp, (0, i, j, 0), end(i, j), (1, 2, 2, 1)), dy) for j in range(4)]
      )
      for i in range(4)
    ]
  )


CONV_METHODS = {'lax': conv_lax, 'im2col': conv_im2col}
CONV_T_METHODS = {'lax': conv_t_lax, 'overlap': conv_t_overlap, 'subpixel': conv_t_subpixel}
KERNEL_GRAD_METHODS = {
  'lax': kernel_grad_lax,
  'im2col': kernel_grad_im2col,
  'taps': kernel_grad_taps,
}


def plan(h: int, c_in: int, impl: str = 'auto', backend: str | None = None):
  """The methods (conv, conv_t, kernel_grad) for the k4 s2 p1 conv of c_in channels at size h.

  Returns None for plain `lax` with jax's autodiff: impl 'lax', or 'auto' off CPU.
  """
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}; got {impl!r}.')
  backend = backend or jax.default_backend()
  if impl == 'lax' or (impl == 'auto' and backend != 'cpu'):
    return None
  if impl == 'fast':
    return 'im2col', 'subpixel' if h == 4 else 'overlap', 'im2col' if h <= 4 else 'taps'
  return (
    'im2col' if h <= 8 else 'lax',
    'overlap' if h <= 2 else 'subpixel' if h == 4 else 'lax',
    'im2col' if h <= 4 else 'taps' if c_in <= 4 else 'lax',
  )


def _varying_axes(x) -> frozenset:
  """The manual mesh axes over which x varies (empty outside shard_map).

  jax 0.10 spells it `jax.typeof(x).mat.varying`; jax 0.7-0.9 spelled it `.vma`. Both
  are read, so that one release's rename does not break the CPU conv paths.
  """
  aval = jax.typeof(x)
  mat = getattr(aval, 'mat', None)
  return frozenset(mat.varying if mat is not None else getattr(aval, 'vma', ()))


def _with_varying_axes_of(ct, primal):
  """The cotangent `ct` with the varying manual mesh axes of `primal` (under shard_map).

  A custom_vjp must return cotangents of its inputs' types. Under `shard_map` with
  check_vma, the batch varies over the device axis and a replicated kernel does not, so
  a kernel gradient computed from per-device activations varies: it is summed over those
  axes, as jax's own transpose of the implicit `pcast(..., to='varying')` of a replicated
  operand does for `lax` ops. (A cotangent that varies less is marked varying.) Outside
  shard_map both sets are empty and this is the identity.
  """
  have, want = _varying_axes(ct), _varying_axes(primal)
  if have - want:
    ct = lax.psum(ct, tuple(sorted(have - want)))
  if want - have:
    ct = lax.pcast(ct, tuple(sorted(want - have)), to='varying')
  return ct


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_k4s2(x, w, methods):
  """conv(x, w) by methods[0]; its vjp is (conv_t(dy, w), kernel_grad(x, dy))."""
  return CONV_METHODS[methods[0]](x, w)


def _conv_k4s2_fwd(x, w, methods):
  """Forward of conv_k4s2, keeping (x, w) for the backward."""
  return conv_k4s2(x, w, methods), (x, w)


def _conv_k4s2_bwd(methods, res, dy):
  """(dx, dw) = (conv_t(dy, w), kernel_grad(x, dy))."""
  x, w = res
  return _with_varying_axes_of(CONV_T_METHODS[methods[1]](dy, w), x), _with_varying_axes_of(
    KERNEL_GRAD_METHODS[methods[2]](x, dy), w
  )


conv_k4s2.defvjp(_conv_k4s2_fwd, _conv_k4s2_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_t_k4s2(x, w, methods):
  """conv_t(x, w) by methods[1]; its vjp is (conv(dy, w), kernel_grad(dy, x))."""
  return CONV_T_METHODS[methods[1]](x, w)


def _conv_t_k4s2_fwd(x, w, methods):
  """Forward of conv_t_k4s2, keeping (x, w) for the backward."""
  return conv_t_k4s2(x, w, methods), (x, w)


def _conv_t_k4s2_bwd(methods, res, dy):
  """(dx, dw) = (conv(dy, w), kernel_grad(dy, x))."""
  x, w = res
  return _with_varying_axes_of(CONV_METHODS[methods[0]](dy, w), x), _with_varying_axes_of(
    KERNEL_GRAD_METHODS[methods[2]](dy, x), w
  )


conv_t_k4s2.defvjp(_conv_t_k4s2_fwd, _conv_t_k4s2_bwd)


def conv2d(x, w, stride: int = 2, padding: int = 1, impl: str = 'auto'):
  """NHWC conv with an HWIO kernel, symmetric padding; the method is chosen at trace time."""
  n, h, wd, c = x.shape
  k = w.shape[0]
  if (k, stride, padding) == (4, 2, 1) and h % 2 == 0 and wd % 2 == 0:
    methods = plan(max(h, wd), c, impl)
    return conv_lax(x, w) if methods is None else conv_k4s2(x, w, methods)
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}; got {impl!r}.')
  one_pixel = (h + 2 * padding - k) // stride == 0 and (wd + 2 * padding - k) // stride == 0
  if impl == 'fast' or (impl == 'auto' and jax.default_backend() == 'cpu' and one_pixel):
    return conv_im2col(x, w, stride, padding)
  return conv_lax(x, w, stride, padding)


def conv_transpose2d(x, kernel, impl: str = 'auto'):
  """4x4 stride-2 transposed conv, padding (2, 2), Flax `ConvTranspose` kernel orientation."""
  methods = plan(2 * max(x.shape[1:3]), kernel.shape[-1], impl)
  if methods is None:
    return lax.conv_transpose(x, kernel, (2, 2), [(2, 2), (2, 2)], dimension_numbers=_DN)
  return conv_t_k4s2(x, _transposed_kernel(kernel), methods)


class Conv(nn.Module):
  """A 2-D convolution over NHWC inputs (PyTorch `Conv2d` semantics).

  Attributes:
    impl: 'auto' (fastest for the shape and backend), 'lax' or 'fast' (see the module doc).
  """

  features: int
  kernel_size: int = 4
  stride: int = 2
  padding: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', conv_init, (k, k, x.shape[-1], self.features))
    y = conv2d(
      x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding, self.impl
    )
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class ConvTranspose(nn.Module):
  """A 4x4, stride-2, padding-1 transposed convolution (output = 2x input size).

  Same kernel layout and orientation as `flax.linen.ConvTranspose(features, (4, 4),
  (2, 2), padding='SAME')`.

  Attributes:
    impl: 'auto' (fastest for the shape and backend), 'lax' or 'fast' (see the module doc).
  """

  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', conv_init, (4, 4, x.shape[-1], self.features))
    y = conv_transpose2d(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y
