"""Deployable artifacts: a trained detector as one model file plus `detector.json`.

    python main.py --workdir=runs/demo --mode=export [--format=stablehlo|onnx]

writes `runs/demo/export/` with `scorer.stablehlo` (the default) or `scorer.onnx`, and
`detector.json`: the input contract, the score kind, the calibration and threshold, the
producing versions, and each model file's size and sha256. The model file holds the
scorer with its weights (and, for the latent k-NN score, the bank of training codes)
baked in as constants; it maps a batch of images to anomaly scores and needs neither
this package nor its checkpoint: see detector.py (a loader that checks every file),
examples/load_exported.py (jax and numpy only) and the README's Deploy section.

The input contract is uint8 NHWC in [0, 255] with any batch size; the model scales to
[-1, 1] itself. Why uint8, not float: a service decodes images to uint8 anyway, and one
integer dtype leaves no room for the silent [0, 1] vs [-1, 1] vs [0, 255] float mix-up;
it is also 4x less data per request.

- StableHLO (`jax.export`, symbolic batch 'b'): lowered for CPU and CUDA in one file.
  The CPU branch uses the fast CPU convolutions of nets/layers.py (their forward passes are
  plain lax ops; the custom gradients are never exported), the other platforms plain
  `lax` convolutions (`lax.platform_dependent`).
- ONNX (`jax2onnx`, optional: see pyproject's `onnx` extra): plain `lax` convolutions,
  which map to ONNX Conv / ConvTranspose.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from skipganomaly_jax.data.images import preprocessing_contract, to_float
from skipganomaly_jax.deploy import trained_run
from skipganomaly_jax.deploy.detector import (
  DETECTOR_JSON,
  DETECTOR_VERSION,
  FILENAMES,
  FORMATS,
  ExportError,
)
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring.scores import check_knn_bank, score_terms

STABLEHLO_PLATFORMS = ('cpu', 'cuda')
ONNX_OPSET = 23
JAX2ONNX_MIN = (0, 17)  # 0.13.0 (the last without an orbax cap) fails on jax 0.10.
JAX2ONNX_INSTALL = "pip install -e '.[onnx]' && pip install --no-deps 'jax2onnx>=0.17.1,<0.18'"


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def scorer(params, lam: float, conv_impl: str = 'auto'):
  """A pure function: uint8 images (N, isize, isize, nc) -> float32 scores (N,).

  Args:
    params: `score_fn`'s params (as `skipganomaly_jax.load` returns them); captured as
      constants, so an exported function carries them.
    lam: weight of the reconstruction term of the paper score.
    conv_impl: how convolutions compute ('auto', 'lax' or 'fast'; see layers.py).

  Returns:
    The scoring function; equal to `score_fn(params, images, lam=lam)` on uint8 images.
  """
  spec = dataclasses.replace(ModelSpec.from_variables(params), conv_impl=conv_impl)
  check_knn_bank(params, spec)
  constants = jax.tree.map(jnp.asarray, params)

  def scores(images):
    return score_terms(constants, to_float(images), lam, spec)['score']

  return scores


def live_only(fn, aval):
  """fn without the computations its output does not depend on (and their constants).

  The traced scorer computes every term of both scores; the latent k-NN score needs only
  G's encoder. XLA prunes the rest when it compiles, but an exported file would still
  carry the unused weights, and onnxruntime does not prune (measured: it kept G's
  decoder and D, 20x slower). So prune the jaxpr (dead-code elimination, top level).

  Args:
    fn: a function of one array.
    aval: its argument's shape and dtype (may have symbolic dimensions).

  Returns:
    A function equal to fn on arguments of that shape and dtype.
  """
  closed = jax.make_jaxpr(fn)(aval)
  jaxpr = closed.jaxpr
  needed = {v for v in jaxpr.outvars if not isinstance(v, jex.Literal)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in needed for v in eqn.outvars):
      eqns.append(eqn)
      needed.update(v for v in eqn.invars if not isinstance(v, jex.Literal))
  kept = [(v, c) for v, c in zip(jaxpr.constvars, closed.consts, strict=True) if v in needed]
  pruned = jaxpr.replace(constvars=[v for v, _ in kept], eqns=eqns[::-1])
  run = jex.jaxpr_as_fun(jex.ClosedJaxpr(pruned, [c for _, c in kept]))
  return lambda x: run(x)[0]


def _input_aval(spec: ModelSpec, batch):
  return jax.ShapeDtypeStruct((batch, spec.isize, spec.isize, spec.nc), jnp.uint8)


def stablehlo_export(params, lam: float, platforms=STABLEHLO_PLATFORMS):
  """The scorer as a `jax.export.Exported`, symbolic batch size 'b'."""
  (batch,) = jax.export.symbolic_shape('b')
  aval = _input_aval(ModelSpec.from_variables(params), batch)
  params = jax.tree.map(jnp.asarray, params)  # One copy of the constants for both.
  # The fast CPU kernels are chosen by the backend at trace time; off a CPU host 'auto'
  # would pick lax for the CPU branch, so force the fast forms there.
  cpu_impl = 'auto' if jax.default_backend() == 'cpu' else 'fast'
  cpu = live_only(scorer(params, lam, cpu_impl), aval)
  other = live_only(scorer(params, lam, 'lax'), aval)
  if 'cpu' not in platforms:
    fn = other
  elif tuple(platforms) == ('cpu',):
    fn = cpu
  else:
    fn = lambda x: jax.lax.platform_dependent(x, cpu=cpu, default=other)
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(aval)


def _jax2onnx():
  try:
    import jax2onnx  # noqa: PLC0415
  except ImportError as e:
    raise ExportError(f'ONNX export needs jax2onnx and onnx: {JAX2ONNX_INSTALL}') from e
  version = tuple(int(p) for p in _version('jax2onnx').split('.')[:2] if p.isdigit())
  if version < JAX2ONNX_MIN:
    raise ExportError(
      f'jax2onnx {_version("jax2onnx")} cannot convert jax {jax.__version__} models; '
      f'install jax2onnx >= 0.17.1: {JAX2ONNX_INSTALL}'
    )
  return jax2onnx


def onnx_bytes(params, lam: float) -> bytes:
  """The scorer as an ONNX model (plain lax convolutions), dynamic batch 'B'."""
  jax2onnx = _jax2onnx()
  (batch,) = jax.export.symbolic_shape('B')
  aval = _input_aval(ModelSpec.from_variables(params), batch)
  # jax2onnx logs a traceback for each of its example plugins whose library (equinox,
  # dm-pix) is absent, and onnx_ir warns about shape-only helper values: all harmless.
  loggers = [logging.getLogger(name) for name in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    model = jax2onnx.to_onnx(
      live_only(scorer(params, lam, 'lax'), aval),
      [aval],
      model_name='skipganomaly_scorer',
      opset=ONNX_OPSET,
      input_names=['images'],
      output_names=['scores'],
    )
  finally:
    for logger, level in zip(loggers, levels, strict=True):
      logger.setLevel(level)
  # jax2onnx annotates some intermediate values with an NCHW shape where the value is
  # NHWC; onnxruntime then warns at every load. The annotations are optional (shapes
  # are inferred again at load), so drop them.
  del model.graph.value_info[:]
  _drop_dead_nodes(model.graph)
  return model.SerializeToString()


def _drop_dead_nodes(graph) -> None:
  """Removes nodes and initializers that no graph output depends on, in place.

  `live_only` already pruned the model; jax2onnx still leaves some helper nodes (shape
  computations) unused: 139 -> 97 nodes for the latent k-NN scorer.
  """
  needed = {output.name for output in graph.output}
  keep = []
  for node in reversed(graph.node):
    if any(name in needed for name in node.output):
      keep.append(node)
      needed.update(name for name in node.input if name)
  keep.reverse()
  initializers = [init for init in graph.initializer if init.name in needed]
  del graph.node[:]
  graph.node.extend(keep)
  del graph.initializer[:]
  graph.initializer.extend(initializers)


def _params_digest(params) -> str:
  """sha256 over every array of params (names and bytes): identifies the weights."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def detector_metadata(params, lam: float, calibration, which) -> dict:
  """detector.json without its 'models' entries (see the module doc).

  Args:
    params: the exported `score_fn` variables (host copies).
    lam: the run's score_lambda, which the exported paper score uses.
    calibration: the run's `metrics.Calibration`.
    which: the checkpoint exported ('latest', 'best' or a step).
  """
  spec = ModelSpec.from_variables(params)
  score_kind = 'latent_knn' if 'knn_bank' in params else 'paper'
  return {
    'detector_version': DETECTOR_VERSION,
    'input': {
      'name': 'images',
      'layout': 'NHWC',
      'shape': [None, spec.isize, spec.isize, spec.nc],
      'dtype': 'uint8',
      'value_range': [0, 255],
      'preprocessing': (
        f'convert to {"grey (PIL L: ITU-R 601-2 luma)" if spec.nc == 1 else "RGB"}, resize '
        f'the shorter side to {spec.isize} (bilinear, PIL), centre-crop {spec.isize}x'
        f'{spec.isize}, uint8 NHWC; the model scales x / 127.5 - 1 (details: the other '
        'input fields; examples/load_exported.py preprocess)'
      ),
      **preprocessing_contract(spec.isize, spec.nc),
    },
    'output': {
      'name': 'scores',
      'shape': [None],
      'dtype': 'float32',
      'meaning': 'anomaly score, higher = more anomalous',
    },
    'score_kind': score_kind,
    # GANomaly's own score has no lambda.
    'score_lambda': float(lam) if spec.name == 'skipganomaly' else None,
    'threshold': float(calibration.threshold),
    'decision': 'anomalous = score > threshold',
    'calibration': calibration.to_dict(),
    'normalised_score': 'score / threshold (1.0 = the threshold; as scores.csv)',
    'model': {k: v for k, v in dataclasses.asdict(spec).items() if k != 'conv_impl'},
    'source': {'checkpoint': str(which), 'params_sha256': _params_digest(params)},
    'versions': {
      'skipganomaly_jax': _version('skipganomaly_jax'),
      'jax': jax.__version__,
      'jaxlib': _version('jaxlib'),
      'flax': _version('flax'),
      'numpy': np.__version__,
      'python': platform.python_version(),
    },
    'models': {},
  }


def _model_entry(fmt: str, data: bytes, exported=None) -> dict:
  entry = {
    'file': FILENAMES[fmt],
    'bytes': len(data),
    'sha256': hashlib.sha256(data).hexdigest(),
  }
  if fmt == 'stablehlo':
    entry['platforms'] = list(exported.platforms)
    entry['serialization'] = 'jax.export.Exported.serialize(); load with jax.export.deserialize'
    entry['calling_convention_version'] = exported.calling_convention_version
  else:
    entry['opset'] = ONNX_OPSET
    entry['jax2onnx'] = _version('jax2onnx')
    entry['onnx'] = _version('onnx')
  return entry


def export_run(workdir: str, fmt: str = 'stablehlo', which='latest') -> str:
  """Exports a trained run's scorer to `workdir/export/`.

  A second format exported from the same weights and calibration is added to the
  existing detector.json; otherwise detector.json (and any stale model file) is replaced.

  Args:
    workdir: the run's workdir.
    fmt: 'stablehlo' or 'onnx'.
    which: the checkpoint: 'latest', 'best' or a step.

  Returns:
    The export directory.

  Raises:
    ExportError: an unknown format, a run without calibration, jax2onnx missing.
    checkpointing.CheckpointError: no or a corrupt checkpoint.
  """
  if fmt not in FORMATS:
    raise ExportError(f'format must be one of {FORMATS}; got {fmt!r}.')
  model = trained_run.restore(workdir, which)
  params, calibration, lam = model.params, model.calibration, float(model.specs.score.lam)
  kind = model.specs.score.kind
  if kind not in ('paper', 'latent_knn'):
    # The exported scorer computes the network scores only: exporting it with this run's
    # threshold would pair the paper score with a threshold fitted on map scores.
    raise ExportError(
      f'the run in {workdir} scores images by {kind!r} (from the smoothed anomaly map), '
      "which the exported scorer does not compute (it exports 'paper' or 'latent_knn'). "
      f'Score this run with --mode=score, or export a run trained with '
      "--config.score_kind=paper or latent_knn."
    )
  if calibration is None:
    raise ExportError(
      f'the checkpoint in {workdir} has no calibration, so no threshold: it was imported '
      'from reference weights without its dataset (python -m '
      'skipganomaly_jax.import_reference --nocalibrate, or the data was missing). Rerun '
      'the import with the dataset in place, then export.'
    )
  params = jax.device_get(params)
  meta = detector_metadata(params, lam, calibration, which)
  exported = stablehlo_export(params, lam) if fmt == 'stablehlo' else None
  data = bytes(exported.serialize()) if exported else onnx_bytes(params, lam)
  directory = os.path.join(workdir, 'export')
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, DETECTOR_JSON)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = {}
    same = all(old.get(k) == meta[k] for k in ('source', 'calibration', 'score_lambda'))
    for other, entry in old.get('models', {}).items():
      if same and other != fmt:
        meta['models'][other] = entry
      elif other != fmt and os.path.isfile(os.path.join(directory, entry.get('file', ''))):
        os.remove(os.path.join(directory, entry['file']))  # Stale: other weights.
  meta['models'][fmt] = _model_entry(fmt, data, exported)
  _write_atomic(os.path.join(directory, FILENAMES[fmt]), data)
  _write_atomic(path, (json.dumps(meta, indent=2) + '\n').encode())
  return directory


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)
