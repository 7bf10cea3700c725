"""Porting the reference's PyTorch weights: `state_dict`s (numpy) -> our Flax variables.

The authors' code (samet-akcay/skip-ganomaly) saves `{'epoch': ..., 'state_dict': ...}`
for its generator (`UnetGenerator`) and discriminator (`BasicDiscriminator`). This module
maps such state dicts, given as dicts of numpy arrays in torch naming and layout, to the
`{'generator': {'params', 'batch_stats'}, 'discriminator': {...}}` variables of
`models.ModelSpec` (the structure `scoring.score_fn` takes). Pure numpy: reading `.pth`
files (which needs torch) is `import_reference`'s job.

Layouts: a torch conv weight (out, in, kh, kw) becomes (kh, kw, in, out); a transposed
conv weight (in, out, kh, kw) becomes (kh, kw, in, out) flipped spatially (our
`layers.ConvTranspose` has `flax.linen.ConvTranspose`'s orientation, which correlates
where torch convolves); BatchNorm weight/bias/running_mean/running_var become
scale/bias/mean/var ('num_batches_tracked' only drives torch's momentum=None mode and is
ignored). Every key of both dicts must be used and every shape must fit, else ValueError.
"""

import math
from collections.abc import Mapping

import numpy as np

from skipganomaly_jax.nets.models import ModelSpec, encoder_levels

IGNORED_SUFFIX = 'num_batches_tracked'
_BN_FIELDS = (('weight', 'params', 'scale'), ('bias', 'params', 'bias'))
_BN_BUFFERS = (('running_mean', 'batch_stats', 'mean'), ('running_var', 'batch_stats', 'var'))


def conv_layout(torch_w: np.ndarray) -> np.ndarray:
  """A torch conv weight (out, in, kh, kw) -> our kernel (kh, kw, in, out)."""
  return torch_w.transpose(2, 3, 1, 0)


def conv_transpose_layout(torch_w: np.ndarray) -> np.ndarray:
  """A torch transposed-conv weight (in, out, kh, kw) -> our kernel, flipped spatially."""
  return torch_w.transpose(2, 3, 0, 1)[::-1, ::-1]


def same_layout(torch_w: np.ndarray) -> np.ndarray:
  """A vector (bias, BatchNorm field) keeps its layout."""
  return torch_w


class Table:
  """A `convert_network` table being built: `rows` maps each torch key to (collection,
  our module, leaf, torch shape, layout transform)."""

  def __init__(self):
    self.rows = {}

  def conv(self, key, module, out_ch, in_ch, k=4, transpose=False, bias=False):
    """Adds a (transposed) conv: torch '<key>.weight' -> module's 'kernel' (and bias)."""
    shape = (in_ch, out_ch, k, k) if transpose else (out_ch, in_ch, k, k)
    fn = conv_transpose_layout if transpose else conv_layout
    self.rows[f'{key}.weight'] = ('params', module, 'kernel', shape, fn)
    if bias:
      self.rows[f'{key}.bias'] = ('params', module, 'bias', (out_ch,), same_layout)

  def batch_norm(self, key, module, channels):
    """Adds a BatchNorm2d's parameters and running statistics."""
    for torch_name, collection, leaf in _BN_FIELDS + _BN_BUFFERS:
      self.rows[f'{key}.{torch_name}'] = (collection, module, leaf, (channels,), same_layout)


def generator_table(spec: ModelSpec) -> dict:
  """The torch keys of the reference's `UnetGenerator` for `spec`, with our names.

  The U-Net nests one `UnetSkipConnectionBlock` per level: the outermost block's
  `model` is [conv, inner block, relu, convT, tanh]; a middle one's is [leaky relu, conv,
  BN, inner block, relu, convT, BN]; the innermost's [leaky relu, conv, relu, convT, BN].
  """
  if spec.drop_outer_skips:
    raise ValueError(
      f'the reference U-Net has every skip connection; got drop_outer_skips='
      f'{spec.drop_outer_skips}. Import into a config with model.drop_outer_skips = 0.'
    )
  levels = int(math.log2(spec.isize))
  widths = [spec.ngf * min(2**i, 8) for i in range(levels)]
  table = Table()
  table.conv('model.model.0', 'down_0', widths[0], spec.nc)
  table.conv('model.model.3', 'up_0', spec.nc, 2 * widths[0], transpose=True, bias=True)
  for i in range(1, levels):
    prefix = 'model.model.1.' + 'model.3.' * (i - 1) + 'model'
    table.conv(f'{prefix}.1', f'down_{i}', widths[i], widths[i - 1])
    if i < levels - 1:
      table.batch_norm(f'{prefix}.2', f'down_bn_{i}', widths[i])
      table.conv(f'{prefix}.5', f'up_{i}', widths[i - 1], 2 * widths[i], transpose=True)
      table.batch_norm(f'{prefix}.6', f'up_bn_{i}', widths[i - 1])
    else:  # Innermost: no norm after its conv, and no skip feeding its convT.
      table.conv(f'{prefix}.3', f'up_{i}', widths[i - 1], widths[i], transpose=True)
      table.batch_norm(f'{prefix}.4', f'up_bn_{i}', widths[i - 1])
  return table.rows


def discriminator_table(spec: ModelSpec) -> dict:
  """The torch keys of the reference's `BasicDiscriminator` for `spec`, with our names.

  Its module names carry the channel counts ('feat.pyramid-8-16-conv'), so a config
  with the wrong nc, ndf or isize reports missing keys.
  """
  table = Table()
  table.conv(f'feat.initial-conv-{spec.nc}-{spec.ndf}', 'conv_0', spec.ndf, spec.nc)
  width = spec.ndf
  for i in range(1, encoder_levels(spec.isize) + 1):
    table.conv(f'feat.pyramid-{width}-{2 * width}-conv', f'conv_{i}', 2 * width, width)
    table.batch_norm(f'feat.pyramid-{2 * width}-batchnorm', f'bn_{i}', 2 * width)
    width *= 2
  table.conv(f'feat.final-{width}-1-conv', 'features', spec.nz, width)
  table.conv('clas.classifier', 'classifier', 1, spec.nz, k=3)
  return table.rows


def strip_data_parallel(state_dict: Mapping) -> dict:
  """Drops the 'module.' prefix that `torch.nn.DataParallel` (the reference on GPU) adds."""
  if state_dict and all(k.startswith('module.') for k in state_dict):
    return {k[len('module.') :]: v for k, v in state_dict.items()}
  return dict(state_dict)


def convert_network(state_dict: Mapping, table: dict, what: str) -> dict:
  """One network's state dict -> {'params': ..., 'batch_stats': ...} (float32 numpy).

  Raises:
    ValueError: a key the table lacks, a key the state dict lacks, or a wrong shape;
      the message names the key, the expected and the got shape.
  """
  state_dict = {
    k: v for k, v in strip_data_parallel(state_dict).items() if not k.endswith(IGNORED_SUFFIX)
  }
  unexpected = sorted(set(state_dict) - set(table))
  missing = sorted(set(table) - set(state_dict))
  if unexpected or missing:
    parts = [f'missing key {k!r} (expected shape {table[k][3]})' for k in missing[:4]]
    parts += [f'unexpected key {k!r} (shape {np.shape(state_dict[k])})' for k in unexpected[:4]]
    more = len(missing) + len(unexpected) - len(parts)
    raise ValueError(
      f'{what} state_dict does not fit the model of this config ({len(missing)} missing, '
      f'{len(unexpected)} unexpected keys): '
      + '; '.join(parts)
      + (f'; {more} more' if more else '')
      + '. Check isize, nc, model.ngf, model.ndf and model.nz against the reference run.'
    )
  variables = {'params': {}, 'batch_stats': {}}
  for key, (collection, module, leaf, shape, transform) in table.items():
    value = np.asarray(state_dict[key])
    if value.shape != shape:
      raise ValueError(
        f'{what} state_dict key {key!r}: expected shape {shape}, got shape {value.shape}. '
        'Check isize, nc, model.ngf, model.ndf and model.nz against the reference run.'
      )
    converted = np.ascontiguousarray(transform(value.astype(np.float32)))
    variables[collection].setdefault(module, {})[leaf] = converted
  return variables


def convert_state_dicts(netg: Mapping, netd: Mapping, spec: ModelSpec) -> dict:
  """The reference's G and D state dicts -> our scoring variables.

  Args:
    netg: the generator's `state_dict` as {torch name: numpy array}.
    netd: the discriminator's `state_dict`, likewise.
    spec: the architecture to build (isize, nc, ngf, ndf, nz of the reference run).

  Returns:
    {'generator': {'params', 'batch_stats'}, 'discriminator': {...}} of float32 numpy
    arrays, as `scoring.score_fn` and `train_step.TrainState` take them.

  Raises:
    ValueError: a key or shape that does not fit `spec` (named in the message).
  """
  return {
    'generator': convert_network(netg, generator_table(spec), 'netG'),
    'discriminator': convert_network(netd, discriminator_table(spec), 'netD'),
  }
