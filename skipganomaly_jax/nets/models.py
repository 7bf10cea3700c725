"""Skip-GANomaly networks: a U-Net generator and a DCGAN discriminator (Flax linen).

Layer-by-layer as in docs/method.md (pix2pix U-Net for G, DCGAN for D), NHWC, inputs
in [-1, 1]. With ngf=ndf=64, nz=100, isize=32 the parameter counts equal the reference's
exactly (G 16,659,075 / D 1,069,700 for nc=3). `ModelSpec` builds these, or GANomaly's
networks (nets/ganomaly.py) for model name 'ganomaly'.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.config import (
  ModelSettings,
  check_drop_outer_skips,
  check_field,
  check_geometry,
  check_model_options,
)
from skipganomaly_jax.nets import layers

__all__ = [
  'BatchNorm',
  'Discriminator',
  'Generator',
  'ModelSpec',
  'batch_norm',
  'bn_scale_init',
  'check_drop_outer_skips',
  'check_geometry',
  'code_conv',
  'conv_layer',
  'conv_transpose_layer',
  'dcgan_features',
  'discriminator_outputs',
  'encoder_levels',
  'reinit_params',
]

Dtype = Any

BN_MOMENTUM = 0.9  # = PyTorch momentum 0.1.
BN_EPSILON = 1e-5


def bn_scale_init(key, shape, dtype=jnp.float32):
  """BatchNorm scale ~ N(1, 0.02), as the reference's `weights_init`."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchNorm(nn.Module):
  """BatchNorm over the channels of NHWC inputs, with PyTorch's running statistics.

  Train mode normalises exactly as `flax.linen.BatchNorm` (float32 statistics,
  E[x^2] - E[x]^2, averaged over `axis_name`), with the same variables ('scale',
  'bias' params; 'mean', 'var' batch_stats), so checkpoints of either load in both. Two
  differences, both PyTorch's `BatchNorm2d` (the reference) and both only in the
  running statistics (they touch eval-mode outputs, not training):

  - the running variance takes the unbiased batch variance, var * n / (n - 1), with n
    the GLOBAL count N*H*W over all devices (so N devices equal one);
  - a call can apply the EMA update `stat_updates` times with the same batch
    statistics: the reference's step runs D twice on G(x) (see train_step).

  Attributes:
    axis_name: mapped axis over which batch statistics are averaged (train mode).
    dtype: output dtype (statistics are float32).
  """

  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, stat_updates: int = 1):
    """Normalises x (NHWC) per channel.

    Args:
      x: activations; the last axis holds the channels.
      train: batch statistics (and `stat_updates` EMA updates of the running ones, except
        at init), else the running statistics.
      stat_updates: EMA updates in train mode.

    Returns:
      The normalised, scaled and shifted x, in `dtype`.
    """
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    if train:
      xf = x.astype(jnp.promote_types(self.dtype, jnp.float32))
      axes = tuple(range(x.ndim - 1))
      moments = jnp.stack([xf.mean(axes), jax.lax.square(xf).mean(axes)])
      count = x.size // x.shape[-1]
      if self.axis_name is not None and not self.is_initializing():
        moments = jax.lax.pmean(moments, self.axis_name)
        count *= jax.lax.axis_size(self.axis_name)
      mean = moments[0]
      var = jnp.maximum(0.0, moments[1] - jax.lax.square(mean))
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1))
        for _ in range(stat_updates):  # Sequential, as the reference's repeated calls.
          ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean
          ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    # Same operations, in the same order, as flax.linen.BatchNorm.
    y = x - mean
    mul = jax.lax.rsqrt(var + BN_EPSILON)
    mul = mul * self.param('scale', bn_scale_init, features, jnp.float32)
    y = y * mul + self.param('bias', nn.initializers.zeros, features, jnp.float32)
    return y.astype(self.dtype)


# Layer builders shared by these networks and GANomaly's (nets/ganomaly.py). Each creates
# its layer as a child of `module`, so it is called from the module's compact `__call__`;
# it reads the module's `dtype`, `conv_impl` (and, for BatchNorm, `axis_name`) fields.


def conv_layer(
  module, features: int, name: str, kernel_size=4, stride=2, padding=1, use_bias=False
):
  """A `layers.Conv` of `module` (4x4 stride 2 padding 1 by default), no bias by default."""
  return layers.Conv(
    features,
    kernel_size=kernel_size,
    stride=stride,
    padding=padding,
    use_bias=use_bias,
    dtype=module.dtype,
    impl=module.conv_impl,
    name=name,
  )


def code_conv(module, features: int, name: str):
  """The 4x4 valid conv (stride 1, no padding) of a DCGAN encoder: 4x4 pixels -> 1x1."""
  return conv_layer(module, features, name, kernel_size=4, stride=1, padding=0)


def conv_transpose_layer(module, features: int, name: str, use_bias=False):
  """A `layers.ConvTranspose` (4x4, stride 2) of `module`, no bias by default."""
  return layers.ConvTranspose(
    features, use_bias=use_bias, dtype=module.dtype, impl=module.conv_impl, name=name
  )


def batch_norm(module, h, name: str, train: bool, stat_updates: int = 1):
  """h through a `BatchNorm` of `module` named `name` (see `BatchNorm.__call__`)."""
  return BatchNorm(module.axis_name, module.dtype, name=name)(h, train, stat_updates)


def encoder_levels(isize: int) -> int:
  """The 4x4 stride-2 convs after the first one of a DCGAN encoder: isize / 2 down to 4."""
  return int(math.log2(isize)) - 3


def dcgan_features(module, x, train: bool, stat_updates: int, width: int, extra_layers: int = 0):
  """A DCGAN encoder of x up to its last hidden activation (N, 4, 4, C), inside `module`.

  A 4x4 stride-2 conv 'conv_0' to `width` channels (no norm) and LeakyReLU(0.2);
  `extra_layers` times a 3x3 stride-1 conv 'extra_<t>' at that width, BatchNorm
  'extra_bn_<t>' and LeakyReLU(0.2); then per level i >= 1 (`encoder_levels(isize)` of
  them, isize from `module.isize`) a 4x4 stride-2 conv 'conv_<i>' doubling the width,
  BatchNorm 'bn_<i>' and LeakyReLU(0.2). `Discriminator`'s features and GANomaly's
  encoders and discriminator all start so.
  """
  h = nn.leaky_relu(conv_layer(module, width, 'conv_0')(x.astype(module.dtype)), 0.2)
  for t in range(extra_layers):
    h = conv_layer(module, width, f'extra_{t}', kernel_size=3, stride=1, padding=1)(h)
    h = nn.leaky_relu(batch_norm(module, h, f'extra_bn_{t}', train, stat_updates), 0.2)
  for i in range(1, encoder_levels(module.isize) + 1):
    width *= 2
    h = conv_layer(module, width, f'conv_{i}')(h)
    h = nn.leaky_relu(batch_norm(module, h, f'bn_{i}', train, stat_updates), 0.2)
  return h


def discriminator_outputs(logits, features):
  """A discriminator's return: (logits (N,), features (N, F)), flattened, in float32."""
  return (
    logits.reshape(-1).astype(jnp.float32),
    features.reshape(features.shape[0], -1).astype(jnp.float32),
  )


class Generator(nn.Module):
  """U-Net encoder-decoder with skip connections; output in [-1, 1] (tanh).

  Attributes:
    isize: image height = width, a power of two >= 32 (sets the number of levels).
    nc: image channels (1 or 3).
    ngf: width of the first level; widths double per level, capped at 8 * ngf.
    axis_name: mapped axis over which BatchNorm averages batch statistics in training.
    dtype: compute dtype (parameters stay float32).
    conv_impl: how convs compute, 'auto' | 'lax' | 'fast' (see `layers`; same params).
    drop_outer_skips: how many of the outermost skip connections to remove (0 = the
      paper's U-Net). The outermost skip carries a 16x16x64 encoding of a 32x32 image,
      enough for G to copy any input, anomalies included (benchmarks/results/quality.md).
  """

  isize: int = 32
  nc: int = 3
  ngf: int = 64
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'
  drop_outer_skips: int = 0

  @nn.compact
  def __call__(self, x, train: bool = True, return_code: bool = False):
    """Reconstructs `x`; with `return_code`, returns (reconstruction, code).

    The code is the innermost encoder output, (N, 8 * ngf) (1x1 spatially): the
    bottleneck that the latent k-NN score compares (scoring.py).
    """
    check_geometry(self.isize, self.nc)
    levels = int(math.log2(self.isize))
    check_drop_outer_skips(self.drop_outer_skips, levels)
    widths = [self.ngf * min(2**i, 8) for i in range(levels)]
    skips = []
    h = x.astype(self.dtype)
    for i in range(levels):
      if i > 0:
        h = nn.leaky_relu(h, 0.2)
      h = conv_layer(self, widths[i], f'down_{i}')(h)
      if 0 < i < levels - 1:  # Outermost and innermost levels have no norm.
        h = batch_norm(self, h, f'down_bn_{i}', train)
      skips.append(h)
    for i in reversed(range(levels)):
      h = nn.relu(h)
      if i == 0:
        h = conv_transpose_layer(self, self.nc, 'up_0', use_bias=True)(h)
        out = jnp.tanh(h.astype(jnp.float32))
        if return_code:
          code = skips[-1]
          return out, code.reshape(code.shape[0], -1).astype(jnp.float32)
        return out
      h = conv_transpose_layer(self, widths[i - 1], f'up_{i}')(h)
      h = batch_norm(self, h, f'up_bn_{i}', train)
      if i - 1 >= self.drop_outer_skips:
        h = jnp.concatenate([skips[i - 1], h], axis=-1)  # Skip first, as the reference.


class Discriminator(nn.Module):
  """DCGAN discriminator that is also the feature extractor f(.).

  Returns:
    (logits, features): logits of shape (N,) (sigmoid = probability of "real") and the
    nz-dimensional features of shape (N, nz).
  """

  isize: int = 32
  nc: int = 3
  ndf: int = 64
  nz: int = 100
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # How convs compute, 'auto' | 'lax' | 'fast' (see `layers`).

  @nn.compact
  def __call__(self, x, train: bool = True, stat_updates: int = 1):
    """D's (logits, features) of x.

    Args:
      x: NHWC images in [-1, 1].
      train: BatchNorm with batch statistics (and running-statistics updates).
      stat_updates: EMA updates of the running statistics in train mode (2 for the
        reconstruction in the reference's step, which runs D on it twice; see train_step).
    """
    check_geometry(self.isize, self.nc)
    h = dcgan_features(self, x, train, stat_updates, self.ndf)  # Down to 4x4.
    features = code_conv(self, self.nz, 'features')(h)
    logits = conv_layer(self, 1, 'classifier', kernel_size=3, stride=1, padding=1)(features)
    return discriminator_outputs(logits, features)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model, the hyper-parameters that fix both networks' shapes, how convs compute.

  A run builds it from its checked `config.ModelSettings` (`from_settings`); a trained
  model's is read back from its variables (`from_variables`). `name` picks the networks
  that `generator()` and `discriminator()` build: 'skipganomaly' (`Generator`,
  `Discriminator` here) or 'ganomaly' (`ganomaly.GanomalyGenerator`, whose D is ngf
  wide, so ndf == ngf; `ganomaly.GanomalyDiscriminator`).
  """

  isize: int = 32
  nc: int = 3
  ngf: int = 64
  ndf: int = 64
  nz: int = 100
  conv_impl: str = 'auto'  # How convs compute, 'auto' | 'lax' | 'fast' (same params).
  drop_outer_skips: int = 0  # Outermost U-Net skips removed (0 = the paper's G).
  name: str = 'skipganomaly'  # Or 'ganomaly'.
  extra_layers: int = 0  # GANomaly's extra 3x3 layers per sub-network (0 = the paper's).

  def __post_init__(self):
    check_geometry(self.isize, self.nc)
    check_drop_outer_skips(self.drop_outer_skips, int(math.log2(self.isize)))
    check_model_options(self.name, self.ngf, self.ndf, self.drop_outer_skips, self.extra_layers)
    check_field('model.conv_impl', self.conv_impl)

  @property
  def code_size(self) -> int:
    """Size of the generator's code of an image (the latent k-NN score's code).

    Skip-GANomaly: the U-Net's innermost encoder output, 8 * ngf channels at 1x1.
    GANomaly: encoder1's code, nz.
    """
    return self.nz if self.name == 'ganomaly' else 8 * self.ngf

  @classmethod
  def from_settings(cls, settings: ModelSettings, conv_impl: str | None = None) -> 'ModelSpec':
    """The networks of a run's checked model settings (`config.specs(cfg).model`); a
    given `conv_impl` overrides theirs (config.model.conv_impl; same parameters)."""
    fields = dataclasses.asdict(settings)
    return cls(**{**fields, 'conv_impl': conv_impl or fields['conv_impl']})

  @classmethod
  def from_config(cls, config) -> 'ModelSpec':
    """For the top of a program: the model settings of a whole run config, checked."""
    return cls.from_settings(config_lib.specs(config).model)

  @classmethod
  def from_variables(cls, variables) -> 'ModelSpec':
    """Reads the spec back from the shapes of {'generator': ..., 'discriminator': ...}.

    GANomaly's variables are told by their 'encoder1' (Skip-GANomaly's G has none).
    """
    g, d = variables['generator']['params'], variables['discriminator']['params']
    if 'encoder1' in g:
      encoder = g['encoder1']
      width = encoder['conv_0']['kernel'].shape[3]
      return cls(
        isize=2 ** (3 + sum(1 for k in encoder if k.startswith('conv_') and k != 'conv_0')),
        nc=encoder['conv_0']['kernel'].shape[2],
        ngf=width,
        ndf=width,
        nz=encoder['final']['kernel'].shape[3],
        name='ganomaly',
        extra_layers=sum(1 for k in encoder if k.startswith('extra_') and 'bn' not in k),
      )
    levels = sum(1 for k in g if k.startswith('down_') and 'bn' not in k)
    # A level without a skip feeds its transposed conv only the decoder's channels.
    with_skip = [
      g[f'up_{i}']['kernel'].shape[2] == 2 * g[f'down_{i}']['kernel'].shape[3]
      for i in range(levels - 1)
    ]
    return cls(
      isize=2**levels,
      nc=g['down_0']['kernel'].shape[2],
      ngf=g['down_0']['kernel'].shape[3],
      ndf=d['conv_0']['kernel'].shape[3],
      nz=d['features']['kernel'].shape[3],
      drop_outer_skips=with_skip.index(True) if True in with_skip else levels - 1,
    )

  def generator(self, axis_name=None, dtype=jnp.float32) -> nn.Module:
    """G: `Generator` (returns G(x), or (G(x), code) with return_code=True), or for
    'ganomaly' `GanomalyGenerator` (returns (G(x), latent_i, latent_o))."""
    if self.name == 'ganomaly':
      # Imported here: nets/ganomaly.py builds on this module (BatchNorm).
      from skipganomaly_jax.nets.ganomaly import GanomalyGenerator  # noqa: PLC0415

      return GanomalyGenerator(
        self.isize,
        self.nc,
        self.ngf,
        self.nz,
        self.extra_layers,
        axis_name=axis_name,
        dtype=dtype,
        conv_impl=self.conv_impl,
      )
    return Generator(
      self.isize,
      self.nc,
      self.ngf,
      axis_name=axis_name,
      dtype=dtype,
      conv_impl=self.conv_impl,
      drop_outer_skips=self.drop_outer_skips,
    )

  def discriminator(self, axis_name=None, dtype=jnp.float32) -> nn.Module:
    """D, returning (logits (N,), features (N, F)): `Discriminator`, or for 'ganomaly'
    `GanomalyDiscriminator` (ngf wide, its features its last hidden layer)."""
    if self.name == 'ganomaly':
      from skipganomaly_jax.nets.ganomaly import GanomalyDiscriminator  # noqa: PLC0415

      return GanomalyDiscriminator(
        self.isize,
        self.nc,
        self.ngf,
        self.extra_layers,
        axis_name=axis_name,
        dtype=dtype,
        conv_impl=self.conv_impl,
      )
    return Discriminator(
      self.isize,
      self.nc,
      self.ndf,
      self.nz,
      axis_name=axis_name,
      dtype=dtype,
      conv_impl=self.conv_impl,
    )


def reinit_params(params, rng: jax.Array):
  """Fresh initial values for a parameter tree, by leaf name (the reference's `weights_init`).

  'kernel' ~ N(0, 0.02), BatchNorm 'scale' ~ N(1, 0.02), 'bias' = 0. Used by the
  discriminator re-initialisation guard inside the jitted step.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(rng, len(leaves))
  new = []
  for (path, leaf), key in zip(leaves, keys, strict=True):
    name = path[-1].key
    if name == 'kernel':
      new.append(0.02 * jax.random.normal(key, leaf.shape, leaf.dtype))
    elif name == 'scale':
      new.append(bn_scale_init(key, leaf.shape, leaf.dtype))
    else:
      new.append(jnp.zeros_like(leaf))
  return jax.tree_util.tree_unflatten(treedef, new)
