"""GANomaly networks (Akcay et al., ACCV 2018), Skip-GANomaly's baseline (Flax linen).

The layers, widths and initialisation of the GANomaly authors' own networks, NHWC, inputs
in [-1, 1]:

- `GanomalyGenerator`: encoder1 (a DCGAN encoder of the image to an nz code) -> decoder
  (a DCGAN decoder of that code back to an image) -> encoder2 (a second encoder of the
  reconstruction). The anomaly score is mean over the code of (latent_i - latent_o)^2.
- `GanomalyDiscriminator`: the same DCGAN encoder with a single output channel, split
  into features (every layer but the last conv) and a classifier (the last conv).

A DCGAN encoder at isize: a 4x4 stride-2 conv to `width` channels (no norm) and
LeakyReLU(0.2); `extra_layers` times a 3x3 stride-1 conv at that width, BatchNorm and
LeakyReLU(0.2); then 4x4 stride-2 convs doubling the width, each with BatchNorm and
LeakyReLU(0.2), down to 4x4 pixels; then a 4x4 valid conv to the code (1x1). The
decoder mirrors it: a 4x4 transposed conv of the 1x1 code to 4x4 pixels at
(ngf // 2) * isize / 4 channels, 4x4 stride-2 transposed convs halving the width up to
isize / 2, each with BatchNorm and ReLU; `extra_layers` times a 3x3 conv, BatchNorm and
ReLU; a last 4x4 stride-2 transposed conv to nc channels (no bias) and tanh. No conv has
a bias.

Built from this package's own blocks, through the layer builders of `models` that the
Skip-GANomaly networks use too (`models.dcgan_features` is the encoder up to 4x4 pixels,
shared with `models.Discriminator`): `layers.Conv` / `layers.ConvTranspose` (so
`conv_impl` picks how convs compute, with the same parameters), `models.BatchNorm`
(PyTorch's running statistics) and the same initialisation as the Skip-GANomaly networks
(conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0), so `models.reinit_params`
re-initialises these too. With ngf = 64, nz = 100, extra_layers = 0, isize 32 and nc 3
the parameter counts equal the authors' exactly: G 3,206,528, D 663,296.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipganomaly_jax.nets import layers
from skipganomaly_jax.nets.models import (
  batch_norm,
  check_geometry,
  code_conv,
  conv_layer,
  conv_transpose_layer,
  dcgan_features,
  discriminator_outputs,
  encoder_levels,
)

__all__ = [
  'CodeConvTranspose',
  'GanomalyDecoder',
  'GanomalyDiscriminator',
  'GanomalyEncoder',
  'GanomalyGenerator',
  'check_ganomaly_widths',
  'decoder_width',
  'encoder_levels',
]

Dtype = Any


def decoder_width(isize: int, ngf: int) -> int:
  """The decoder's width at 4x4 pixels: (ngf // 2) doubled once per level up to isize / 2.

  The authors' formula; it equals ngf * isize / 8 for even ngf.
  """
  return (ngf // 2) * (isize // 4)


def check_ganomaly_widths(ngf: int, nz: int, extra_layers: int) -> None:
  """Raises ValueError unless ngf >= 2, nz >= 1 and extra_layers >= 0 (integers)."""
  for name, value, low in (('ngf', ngf, 2), ('nz', nz, 1), ('extra_layers', extra_layers, 0)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f'{name} must be an integer >= {low}; got {value!r}.')


class CodeConvTranspose(nn.Module):
  """4x4 transposed conv, stride 1, no padding, of a 1x1 input: (N, C) -> (N, 4, 4, F).

  PyTorch's `ConvTranspose2d(C, F, 4, 1, 0)` on a 1x1 input, computed as one matmul on
  every backend. The kernel has `flax.linen.ConvTranspose`'s layout and orientation (as
  `layers.ConvTranspose`): (4, 4, C, F), spatially flipped with respect to torch's.

  Attributes:
    features: output channels F.
    dtype: compute dtype (the kernel stays float32).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    """Args: z: codes (N, C) or (N, 1, 1, C). Returns: (N, 4, 4, F) in `dtype`."""
    z = z.reshape(z.shape[0], -1).astype(self.dtype)
    kernel = self.param('kernel', layers.conv_init, (4, 4, z.shape[-1], self.features))
    w = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(z.shape[-1], -1).astype(self.dtype)
    y = jax.lax.dot_general(z, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(self.dtype).reshape(z.shape[0], 4, 4, self.features)


class GanomalyEncoder(nn.Module):
  """DCGAN encoder of an image to an nz code (the authors' `Encoder`).

  Attributes:
    isize: image height = width, a power of two >= 32.
    width: channels of the first level; doubled per level (ngf in the authors' code).
    nz: code size (the last conv's channels, named 'final').
    extra_layers: 3x3 conv + BatchNorm + LeakyReLU(0.2) layers at the first level.
    axis_name: mapped axis over which BatchNorm averages batch statistics in training.
    dtype: compute dtype (parameters stay float32).
    conv_impl: how convs compute, 'auto' | 'lax' | 'fast' (see `layers`; same params).
  """

  isize: int = 32
  width: int = 64
  nz: int = 100
  extra_layers: int = 0
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = True, stat_updates: int = 1):
    """The code of x: (N, nz), in `dtype` (the 1x1 spatial axes dropped)."""
    h = dcgan_features(self, x, train, stat_updates, self.width, self.extra_layers)
    code = code_conv(self, self.nz, 'final')(h)
    return code.reshape(code.shape[0], self.nz)


class GanomalyDecoder(nn.Module):
  """DCGAN decoder of an nz code to an image in [-1, 1] (the authors' `Decoder`).

  Layers: 'convt_0' (1x1 -> 4x4) and 'bn_0'; 'convt_<i>', 'bn_<i>' per doubling up to
  isize / 2; 'extra_<t>', 'extra_bn_<t>'; 'final' (to nc channels, no bias) and tanh.

  Attributes:
    isize: image height = width, a power of two >= 32.
    nc: image channels.
    ngf: sets the widths: decoder_width(isize, ngf) at 4x4, halved per level.
    extra_layers: 3x3 conv + BatchNorm + ReLU layers at isize / 2, before the last layer.
    axis_name, dtype, conv_impl: as `GanomalyEncoder`.
  """

  isize: int = 32
  nc: int = 3
  ngf: int = 64
  extra_layers: int = 0
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, z, train: bool = True):
    """The image of codes z ((N, nz) or (N, 1, 1, nz)): (N, isize, isize, nc), float32."""
    width = decoder_width(self.isize, self.ngf)
    h = CodeConvTranspose(width, self.dtype, name='convt_0')(z)
    h = nn.relu(batch_norm(self, h, 'bn_0', train))
    for i in range(1, encoder_levels(self.isize) + 1):
      width //= 2
      h = conv_transpose_layer(self, width, f'convt_{i}')(h)
      h = nn.relu(batch_norm(self, h, f'bn_{i}', train))
    for t in range(self.extra_layers):
      h = conv_layer(self, width, f'extra_{t}', kernel_size=3, stride=1, padding=1)(h)
      h = nn.relu(batch_norm(self, h, f'extra_bn_{t}', train))
    h = conv_transpose_layer(self, self.nc, 'final')(h)
    return jnp.tanh(h.astype(jnp.float32))


class GanomalyGenerator(nn.Module):
  """GANomaly's generator: encoder1 -> decoder -> encoder2 (the authors' `NetG`).

  Attributes:
    isize: image height = width, a power of two >= 32.
    nc: image channels (1 or 3).
    ngf: width of both encoders' first level (and, through decoder_width, the decoder's).
    nz: code size.
    extra_layers: the authors' `extralayers` option, for all three sub-networks (0 in
      their defaults and the paper).
    axis_name, dtype, conv_impl: as `GanomalyEncoder`.
  """

  isize: int = 32
  nc: int = 3
  ngf: int = 64
  nz: int = 100
  extra_layers: int = 0
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Reconstructs x and encodes it and its reconstruction.

    Args:
      x: NHWC images in [-1, 1], (N, isize, isize, nc).
      train: BatchNorm with batch statistics (and running-statistics updates).

    Returns:
      (fake, latent_i, latent_o), float32: the reconstruction G(x) (N, isize, isize, nc)
      in [-1, 1]; the codes of x and of G(x), (N, nz) each. The codes are flat, as the
      Skip-GANomaly networks' features and bottleneck codes (the authors' (N, nz, 1, 1)
      with the 1x1 spatial axes dropped), so scores and losses reduce them over axis 1
      alike. The GANomaly score is mean((latent_i - latent_o)^2, axis=1).
    """
    check_geometry(self.isize, self.nc)
    check_ganomaly_widths(self.ngf, self.nz, self.extra_layers)
    common = dict(axis_name=self.axis_name, dtype=self.dtype, conv_impl=self.conv_impl)
    encoder = lambda name: GanomalyEncoder(
      self.isize, self.ngf, self.nz, self.extra_layers, name=name, **common
    )
    latent_i = encoder('encoder1')(x, train)
    fake = GanomalyDecoder(
      self.isize, self.nc, self.ngf, self.extra_layers, name='decoder', **common
    )(latent_i, train)
    latent_o = encoder('encoder2')(fake, train)
    return fake, latent_i.astype(jnp.float32), latent_o.astype(jnp.float32)


class GanomalyDiscriminator(nn.Module):
  """GANomaly's discriminator: a DCGAN encoder to one channel (the authors' `NetD`).

  Same interface as `models.Discriminator`: `__call__` returns (logits (N,), features
  (N, F)), so training and scoring code treats both alike. The features are the
  encoder's last hidden activation, 4x4 pixels at ngf * isize / 8 channels, flattened in
  NHWC order (F = 16 * ngf * isize / 8; the authors keep (N, C, 4, 4), an order that
  only means and sums over all features see, and those do not depend on it). The logits
  are those of the authors' sigmoid output: sigmoid(logits) is their D(x).

  Its width is `ngf`, not a separate ndf: the authors build NetD from `opt.ngf` (their
  `--ndf` is read but never used), so a GANomaly model with ngf != ndf has a D as wide as
  its G. Parameters: 'conv_0', 'extra_<t>', 'extra_bn_<t>', 'conv_<i>', 'bn_<i>' and
  'classifier' (the last 4x4 valid conv to 1 channel).

  Attributes:
    isize: image height = width, a power of two >= 32.
    nc: image channels (1 or 3).
    ngf: width of the first level, doubled per level (the authors' opt.ngf).
    extra_layers, axis_name, dtype, conv_impl: as `GanomalyEncoder`.
  """

  isize: int = 32
  nc: int = 3
  ngf: int = 64
  extra_layers: int = 0
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = True, stat_updates: int = 1):
    """D's (logits, features) of x, as `models.Discriminator.__call__` (the authors' step
    also runs D on the same batch more than once: `stat_updates`).

    Returns:
      (logits, features): float32 logits (N,) and features (N, F), F as in the class doc.
    """
    check_geometry(self.isize, self.nc)
    check_ganomaly_widths(self.ngf, 1, self.extra_layers)
    h = dcgan_features(self, x, train, stat_updates, self.ngf, self.extra_layers)
    return discriminator_outputs(code_conv(self, 1, 'classifier')(h), h)
