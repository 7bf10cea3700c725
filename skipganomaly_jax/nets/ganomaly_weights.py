"""Porting the GANomaly authors' PyTorch weights: `state_dict`s (numpy) -> our Flax variables.

The GANomaly authors' `NetG` holds three sub-networks, `encoder1`, `decoder` and
`encoder2`, each an `nn.Sequential` named `main` whose layer names carry their channel
counts ('encoder1.main.pyramid-8-16-conv.weight'); their `NetD` splits the same encoder's
layers into `features.<index>` and `classifier.0`. This module maps such state dicts,
given as dicts of numpy arrays in torch naming and layout, to the {'params',
'batch_stats'} variables of `ganomaly.GanomalyGenerator` and `ganomaly.GanomalyDiscriminator`
(the architecture is read from the modules' fields). Pure numpy, no torch.

Layouts and checks are those of `torch_weights` (whose `convert_network` does the work
for each sub-network): conv (out, in, kh, kw) -> (kh, kw, in, out); transposed conv
(in, out, kh, kw) -> (kh, kw, in, out) flipped spatially (the first, 1x1 -> 4x4 one of
the decoder included: `ganomaly.CodeConvTranspose` keeps Flax's orientation); BatchNorm
weight/bias/running_mean/running_var -> scale/bias/mean/var; 'num_batches_tracked' is
ignored. Every key must be used and every shape must fit, else ValueError. The tables
(`encoder_table`, ...) are `convert_network`'s, built by `torch_weights.Table`: torch key
-> (collection, our layer, leaf, torch shape, layout transform).
"""

from collections.abc import Mapping

from skipganomaly_jax.nets import torch_weights
from skipganomaly_jax.nets.ganomaly import (
  GanomalyDiscriminator,
  GanomalyGenerator,
  decoder_width,
  encoder_levels,
)

__all__ = [
  'convert_discriminator',
  'convert_generator',
  'convert_state_dicts',
  'decoder_table',
  'discriminator_table',
  'encoder_table',
]

G_PARTS = ('encoder1', 'decoder', 'encoder2')


def _encoder_layers(isize: int, nc: int, width: int, extra_layers: int) -> tuple[list, int]:
  """The authors' encoder layers before the final conv, in order, with our names.

  Returns:
    (layers, width): layers as [(torch module name, our name, kind, out channels, in
    channels)], kind 'conv4' (4x4 stride 2), 'conv3' (3x3 extra layer), 'bn' or None
    (a LeakyReLU: no parameters, but it takes a position in `NetD.features`); width is
    the channels of the last one.
  """
  relu = ('relu', None, None, 0, 0)
  out = [(f'initial-conv-{nc}-{width}', 'conv_0', 'conv4', width, nc), relu]
  for t in range(extra_layers):
    out.append((f'extra-layers-{t}-{width}-conv', f'extra_{t}', 'conv3', width, width))
    out.append((f'extra-layers-{t}-{width}-batchnorm', f'extra_bn_{t}', 'bn', width, 0))
    out.append(relu)
  for i in range(1, encoder_levels(isize) + 1):
    out.append((f'pyramid-{width}-{2 * width}-conv', f'conv_{i}', 'conv4', 2 * width, width))
    out.append((f'pyramid-{2 * width}-batchnorm', f'bn_{i}', 'bn', 2 * width, 0))
    out.append(relu)
    width *= 2
  return out, width


def _add_layer(table, key, module, kind, out_ch, in_ch):
  """Adds one entry of `_encoder_layers` to `table` (nothing for an activation)."""
  if kind == 'bn':
    table.batch_norm(key, module, out_ch)
  elif kind:
    table.conv(key, module, out_ch, in_ch, k=3 if kind == 'conv3' else 4)


def encoder_table(isize: int, nc: int, width: int, nz: int, extra_layers: int = 0) -> dict:
  """The torch keys of one authors' `Encoder` (relative to its `main.`), with our names.

  Its last conv is named 'final-<width>-1-conv' whatever nz is (the authors' name).
  """
  table = torch_weights.Table()
  layer_list, width = _encoder_layers(isize, nc, width, extra_layers)
  for key, module, kind, out_ch, in_ch in layer_list:
    _add_layer(table, key, module, kind, out_ch, in_ch)
  table.conv(f'final-{width}-1-conv', 'final', nz, width)
  return table.rows


def decoder_table(isize: int, nc: int, ngf: int, nz: int, extra_layers: int = 0) -> dict:
  """The torch keys of the authors' `Decoder` (relative to its `main.`), with our names."""
  table = torch_weights.Table()
  width = decoder_width(isize, ngf)
  table.conv(f'initial-{nz}-{width}-convt', 'convt_0', width, nz, transpose=True)
  table.batch_norm(f'initial-{width}-batchnorm', 'bn_0', width)
  for i in range(1, encoder_levels(isize) + 1):
    key = f'pyramid-{width}-{width // 2}-convt'
    table.conv(key, f'convt_{i}', width // 2, width, transpose=True)
    table.batch_norm(f'pyramid-{width // 2}-batchnorm', f'bn_{i}', width // 2)
    width //= 2
  for t in range(extra_layers):
    table.conv(f'extra-layers-{t}-{width}-conv', f'extra_{t}', width, width, k=3)
    table.batch_norm(f'extra-layers-{t}-{width}-batchnorm', f'extra_bn_{t}', width)
  table.conv(f'final-{width}-{nc}-convt', 'final', nc, width, transpose=True)
  return table.rows


def discriminator_table(isize: int, nc: int, ngf: int, extra_layers: int = 0) -> dict:
  """The torch keys of the authors' `NetD`, with our names.

  NetD is their encoder (nz = 1, width ngf) cut into `features` (an `nn.Sequential` of
  every layer but the last, so keyed by position, activations counted) and `classifier`
  (the last conv, then a parameter-free sigmoid).
  """
  table = torch_weights.Table()
  layer_list, width = _encoder_layers(isize, nc, ngf, extra_layers)
  for index, (_, module, kind, out_ch, in_ch) in enumerate(layer_list):
    _add_layer(table, f'features.{index}', module, kind, out_ch, in_ch)
  table.conv('classifier.0', 'classifier', 1, width)
  return table.rows


def _split_generator(netg: Mapping) -> dict:
  """netG's state dict -> {part: its `main` sub-dict}; ValueError on any other key."""
  netg = torch_weights.strip_data_parallel(netg)
  parts = {part: {} for part in G_PARTS}
  stray = []
  for key, value in netg.items():
    part, _, rest = key.partition('.main.')
    if part in parts and rest:
      parts[part][rest] = value
    elif not key.endswith(torch_weights.IGNORED_SUFFIX):
      stray.append(key)
  if stray:
    raise ValueError(
      f'netG state_dict has {len(stray)} keys outside {", ".join(G_PARTS)} '
      f"(e.g. {stray[0]!r}): not the GANomaly authors' NetG."
    )
  return parts


def convert_generator(netg: Mapping, generator: GanomalyGenerator) -> dict:
  """The authors' `NetG` state dict -> `generator`'s {'params', 'batch_stats'}.

  Args:
    netg: {torch name: numpy array}, running statistics included.
    generator: the module whose fields (isize, nc, ngf, nz, extra_layers) fix the shapes.

  Returns:
    {'params': {'encoder1', 'decoder', 'encoder2'}, 'batch_stats': {...}}, float32 numpy.

  Raises:
    ValueError: a missing or unexpected key, or a wrong shape (named in the message).
  """
  g = generator
  tables = {
    'encoder1': encoder_table(g.isize, g.nc, g.ngf, g.nz, g.extra_layers),
    'decoder': decoder_table(g.isize, g.nc, g.ngf, g.nz, g.extra_layers),
    'encoder2': encoder_table(g.isize, g.nc, g.ngf, g.nz, g.extra_layers),
  }
  variables = {'params': {}, 'batch_stats': {}}
  for part, state_dict in _split_generator(netg).items():
    converted = torch_weights.convert_network(state_dict, tables[part], f'netG.{part}')
    for collection, tree in converted.items():
      variables[collection][part] = tree
  return variables


def convert_discriminator(netd: Mapping, discriminator: GanomalyDiscriminator) -> dict:
  """The authors' `NetD` state dict -> `discriminator`'s {'params', 'batch_stats'}.

  Raises:
    ValueError: a missing or unexpected key, or a wrong shape (named in the message).
  """
  d = discriminator
  table = discriminator_table(d.isize, d.nc, d.ngf, d.extra_layers)
  return torch_weights.convert_network(netd, table, 'netD')


def convert_state_dicts(
  netg: Mapping, netd: Mapping, generator: GanomalyGenerator, discriminator: GanomalyDiscriminator
) -> dict:
  """Both networks: {'generator': {'params', 'batch_stats'}, 'discriminator': {...}}."""
  return {
    'generator': convert_generator(netg, generator),
    'discriminator': convert_discriminator(netd, discriminator),
  }
