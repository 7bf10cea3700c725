"""4x4 convolution layers of Skip-GANomaly, with backend-aware implementations.

Both layers hold exactly the parameters of `flax.linen.Conv` / `flax.linen.ConvTranspose`
('kernel' of shape (kh, kw, in, out), optional 'bias'), so checkpoints and parameter
counts do not depend on which implementation computes them.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

conv_init = nn.initializers.normal(stddev=0.02)

IMPLS = ('auto', 'lax', 'fast')
_DN = ('NHWC', 'HWIO', 'NHWC')
# Transposed conv 4x4, stride 2, padding (2, 2): output row 2a + p reads input rows a + d
# with kernel row k, for (d, k) in _PHASE_TAPS[p].
_PHASE_TAPS = (((-1, 0), (0, 2)), ((0, 1), (1, 3)))


def _tap_range(k: int, stride: int, pad: int, size: int, out: int) -> tuple[int, int]:
  """The kernel taps [lo, hi) that read at least one input (not padding) position."""
  used = [i for i in range(k) if any(0 <= i + stride * o - pad < size for o in range(out))]
  return used[0], used[-1] + 1


def conv_lax(x, kernel, stride: int, padding: int):
  """Reference: `lax.conv_general_dilated`."""
  return lax.conv_general_dilated(
    x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DN
  )


def conv_im2col(x, kernel, stride: int, padding: int):
  """Patches (pad + strided slices of the taps that see the input) + one `dot`."""
  n, h, w, c = x.shape
  k, f = kernel.shape[0], kernel.shape[-1]
  ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
  r0, r1 = _tap_range(k, stride, padding, h, ho)
  c0, c1 = _tap_range(k, stride, padding, w, wo)
  kernel = kernel[r0:r1, c0:c1].reshape(-1, f)
  lo_h, lo_w = max(0, padding - r0), max(0, padding - c0)
  hi_h = max(0, r1 - 1 - padding + stride * (ho - 1) - (h - 1))
  hi_w = max(0, c1 - 1 - padding + stride * (wo - 1) - (w - 1))
  if ho == wo == 1 and (r1 - r0, c1 - c0) == (h, w) and lo_h == lo_w == 0:
    return jnp.dot(x.reshape(n, -1), kernel).reshape(n, 1, 1, f)  # Kernel covers input.
  xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  taps = []
  for i in range(r0 - padding + lo_h, r1 - padding + lo_h):
    for j in range(c0 - padding + lo_w, c1 - padding + lo_w):
      end = (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c)
      taps.append(lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1)))
  patches = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
  return jnp.dot(patches, kernel)


def conv_s2d(x, kernel, stride: int, padding: int):
  """k=2s conv as a 2x2 stride-1 `lax` conv over the space-to-depth padded input."""
  n, h, w, c = x.shape
  k, f = kernel.shape[0], kernel.shape[-1]
  s = stride
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  hp, wp = h + 2 * padding, w + 2 * padding
  xs = xp.reshape(n, hp // s, s, wp // s, s, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(n, hp // s, wp // s, s * s * c)
  ks = kernel.reshape(k // s, s, k // s, s, c, f).transpose(0, 2, 1, 3, 4, 5)
  ks = ks.reshape(k // s, k // s, s * s * c, f)
  return lax.conv_general_dilated(xs, ks, (1, 1), 'VALID', dimension_numbers=_DN)


def conv_transpose_lax(x, kernel):
  """Reference: `lax.conv_transpose`, 4x4, stride 2, padding (2, 2) (Flax orientation)."""
  return lax.conv_transpose(x, kernel, (2, 2), [(2, 2), (2, 2)], dimension_numbers=_DN)


def _interleave(phases, n, h, w, f):
  """[[y00, y01], [y10, y11]] of (n, h, w, f) -> (n, 2h, 2w, f) with y[2a+p, 2b+q] = ypq."""
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
  return y.reshape(n, 2 * h, 2 * w, f)


def conv_transpose_overlap(x, kernel):
  """One `dot` with all 16 taps (the einsum form), then an overlap-add of shifted slices."""
  n, h, w, c = x.shape
  f = kernel.shape[-1]
  if h == w == 1:  # Only the taps (2, 1) x (2, 1) see the input: one matmul.
    wk = kernel[2:0:-1, 2:0:-1].transpose(2, 0, 1, 3).reshape(c, 4 * f)
    return jnp.dot(x.reshape(n, c), wk).reshape(n, 2, 2, f)
  z = jnp.dot(x, kernel.transpose(2, 0, 1, 3).reshape(c, 16 * f)).reshape(n, h, w, 4, 4, f)
  z = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  phases = []
  for taps_r in _PHASE_TAPS:
    rows = [z[:, 1 + d : 1 + d + h, :, kr] for d, kr in taps_r]
    r = rows[0] + rows[1]  # (n, h, w + 2, 4, f)
    row = []
    for taps_c in _PHASE_TAPS:
      cols = [r[:, :, 1 + d : 1 + d + w, kc] for d, kc in taps_c]
      row.append(cols[0] + cols[1])
    phases.append(row)
  return _interleave(phases, n, h, w, f)


def conv_transpose_subpixel(x, kernel):
  """Four output phases, each a 2x2 stride-1 conv as patches + `dot` (sub-pixel form)."""
  n, h, w, c = x.shape
  f = kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  phases = []
  for taps_r in _PHASE_TAPS:
    row = []
    for taps_c in _PHASE_TAPS:
      pieces = [
        xp[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for dr, _ in taps_r for dc, _ in taps_c
      ]
      wk = jnp.stack([kernel[kr, kc] for _, kr in taps_r for _, kc in taps_c]).reshape(4 * c, f)
      row.append(jnp.dot(jnp.concatenate(pieces, axis=-1), wk))
    phases.append(row)
  return _interleave(phases, n, h, w, f)


def conv_transpose_phaselax(x, kernel):
  """All four phases as one 3x3 stride-1 `lax` conv with 4*f outputs, then depth-to-space."""
  n, h, w, c = x.shape
  f = kernel.shape[-1]
  k3 = jnp.zeros((3, 3, c, 2, 2, f), kernel.dtype)
  for p, taps_r in enumerate(_PHASE_TAPS):
    for q, taps_c in enumerate(_PHASE_TAPS):
      for dr, kr in taps_r:
        for dc, kc in taps_c:
          k3 = k3.at[1 + dr, 1 + dc, :, p, q].set(kernel[kr, kc])
  y = lax.conv_general_dilated(
    x, k3.reshape(3, 3, c, 4 * f), (1, 1), [(1, 1)] * 2, dimension_numbers=_DN
  )
  return y.reshape(n, h, w, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, f)


CONV_METHODS = {'lax': conv_lax, 'im2col': conv_im2col, 's2d': conv_s2d}
CONV_TRANSPOSE_METHODS = {
  'lax': conv_transpose_lax,
  'overlap': conv_transpose_overlap,
  'subpixel': conv_transpose_subpixel,
  'phaselax': conv_transpose_phaselax,
}


class Conv(nn.Module):
  """A 2-D convolution over NHWC inputs (PyTorch `Conv2d` semantics)."""

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
    fn = CONV_METHODS[self.impl if self.impl in CONV_METHODS else 'im2col']
    y = fn(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class ConvTranspose(nn.Module):
  """A 4x4, stride-2, padding-1 transposed convolution (output = 2x input size).

  Same kernel layout and orientation as `flax.linen.ConvTranspose(features, (4, 4),
  (2, 2), padding='SAME')`.
  """

  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', conv_init, (4, 4, x.shape[-1], self.features))
    fn = CONV_TRANSPOSE_METHODS[self.impl if self.impl in CONV_TRANSPOSE_METHODS else 'overlap']
    y = fn(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


del jax
