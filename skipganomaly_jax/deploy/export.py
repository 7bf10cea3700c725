"""Deployable artifacts: a trained detector as one model file plus `detector.json`.

    python main.py --workdir=runs/demo --mode=export [--format=stablehlo|onnx]

writes `runs/demo/export/` with `scorer.stablehlo` (the default) or `scorer.onnx`, and
`detector.json`: the input contract, the score (kind, lambda, dtype, map settings), the
calibration and threshold, the producing versions, and each model file's size and
sha256. The model file computes the run's own score (`skipganomaly_jax.load`'s
`score_fn`, map scores included: the map's units are constants once evaluated) with its
weights (and, for the latent k-NN score, the bank of training codes) baked in as
constants; it maps a batch of images to anomaly scores and needs neither this package
nor its checkpoint: see detector.py (a loader that checks every file),
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
from skipganomaly_jax.scoring import run_score
from skipganomaly_jax.scoring.scores import check_params, run_options, score_terms

STABLEHLO_PLATFORMS = ('cpu', 'cuda')
ONNX_OPSET = 23
JAX2ONNX_MIN = (0, 17)  # 0.13.0 (the last without an orbax cap) fails on jax 0.10.
JAX2ONNX_INSTALL = "pip install -e '.[onnx]' && pip install --no-deps 'jax2onnx>=0.17.1,<0.18'"


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def scorer(params, conv_impl: str = 'auto'):
  """A pure function: uint8 images (N, isize, isize, nc) -> float32 scores (N,).

  Args:
    params: `score_fn`'s params (as `skipganomaly_jax.load` returns them, with the run's
      'run_score': its kind, lambda, dtype and map settings); captured as constants, so
      an exported function carries them.
    conv_impl: how convolutions compute ('auto', 'lax' or 'fast'; see layers.py).

  Returns:
    The scoring function; equal to `score_fn(params, images)` on uint8 images.
  """
  spec = dataclasses.replace(check_params(params), conv_impl=conv_impl)
  lam, dtype = run_options(params)
  constants = jax.tree.map(jnp.asarray, params)

  def scores(images):
    out = score_terms(constants, to_float(images), lam, spec, dtype=dtype)['score']
    return out.astype(jnp.float32)  # The contract's dtype, whatever the compute dtype.

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


def stablehlo_export(params, platforms=STABLEHLO_PLATFORMS):
  """The scorer as a `jax.export.Exported`, symbolic batch size 'b'."""
  (batch,) = jax.export.symbolic_shape('b')
  aval = _input_aval(ModelSpec.from_variables(params), batch)
  params = jax.tree.map(jnp.asarray, params)  # One copy of the constants for both.
  # The fast CPU kernels are chosen by the backend at trace time; off a CPU host 'auto'
  # would pick lax for the CPU branch, so force the fast forms there.
  cpu_impl = 'auto' if jax.default_backend() == 'cpu' else 'fast'
  cpu = live_only(scorer(params, cpu_impl), aval)
  other = live_only(scorer(params, 'lax'), aval)
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


def onnx_bytes(params) -> bytes:
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
      live_only(scorer(params, 'lax'), aval),
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


def detector_metadata(params, calibration, which) -> dict:
  """detector.json without its 'models' entries (see the module doc).

  Args:
    params: the exported `score_fn` variables (host copies) with the run's 'run_score'.
    calibration: the run's `metrics.Calibration`.
    which: the checkpoint exported ('latest', 'best' or a step).
  """
  spec = ModelSpec.from_variables(params)
  run = run_score.of(params)
  if run is None:
    raise ExportError(
      "detector.json names the exported score: params need the run's 'run_score' "
      '(skipganomaly_jax.load(workdir) or trained_run.run_params(model)).'
    )
  lam = run.lam
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
    'score_kind': run.kind,  # The exported score: config.score_kind of the run.
    # GANomaly's own score has no lambda.
    'score_lambda': float(lam) if spec.name == 'skipganomaly' else None,
    'score': run.describe(),
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
    checkpointing.CheckpointError: no or a corrupt checkpoint; a 'rec+d' map-score
      checkpoint saved before its map scale was stored (says how to store it).
  """
  if fmt not in FORMATS:
    raise ExportError(f'format must be one of {FORMATS}; got {fmt!r}.')
  model = trained_run.restore(workdir, which)
  calibration = model.calibration
  if calibration is None:
    raise ExportError(
      f'the checkpoint in {workdir} has no calibration, so no threshold: it was imported '
      'from reference weights without its dataset (python -m '
      'skipganomaly_jax.import_reference --nocalibrate, or the data was missing). Rerun '
      'the import with the dataset in place, then export.'
    )
  # The run's own score, map scores included ('rec+d': its units stored at evaluation).
  params = jax.device_get(trained_run.run_params(model))
  meta = detector_metadata(params, calibration, which)
  exported = stablehlo_export(params) if fmt == 'stablehlo' else None
  data = bytes(exported.serialize()) if exported else onnx_bytes(params)
  directory = os.path.join(workdir, 'export')
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, DETECTOR_JSON)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = {}
    same = all(old.get(k) == meta[k] for k in ('source', 'calibration', 'score_lambda', 'score'))
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
