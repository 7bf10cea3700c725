"""Loading an export of export.py: `load_exported(directory, fmt)`, with checks.

Every file is checked before it is deserialised: detector.json's version, the model
file's size and sha256 (a truncated or altered copy can still deserialise, e.g. a
flipped byte in a weight, and score wrong without a sign), then the images' dtype and
shape. Needs jax (StableHLO) or onnxruntime (ONNX), not the training stack.
"""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

FORMATS = ('stablehlo', 'onnx')
FILENAMES = {'stablehlo': 'scorer.stablehlo', 'onnx': 'scorer.onnx'}
DETECTOR_JSON = 'detector.json'
DETECTOR_VERSION = 1  # Bump when detector.json changes incompatibly.


class ExportError(ValueError):
  """An export cannot be written or read: missing, truncated or corrupt files."""


@dataclasses.dataclass(frozen=True)
class ExportedDetector:
  """A loaded export: `score(images)` and the threshold decision.

  Attributes:
    metadata: detector.json as a dict.
    fmt: the format of the loaded model file.
  """

  metadata: dict
  fmt: str
  _run: object

  @property
  def threshold(self) -> float:
    return float(self.metadata['threshold'])

  def score(self, images) -> np.ndarray:
    """Anomaly scores (N,) float32 of uint8 images (N, isize, isize, nc)."""
    return self._run(_check_input(images, self.metadata['input']))

  def is_anomalous(self, scores) -> np.ndarray:
    """True where a score is above the threshold (as `Calibration.is_anomalous`)."""
    return np.asarray(scores, np.float64) > self.threshold


def _check_input(images, spec: dict) -> np.ndarray:
  shape = list(spec['shape'][1:])
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(
      f'images must be uint8 in [0, 255], shape (N, {", ".join(map(str, shape))}); got '
      f'{images.dtype}. From floats in [-1, 1]: np.round((x + 1) * 127.5).astype(np.uint8).'
    )
  if images.ndim != 4 or list(images.shape[1:]) != shape:
    raise ValueError(
      f'images must have shape (N, {", ".join(map(str, shape))}) (NHWC); got '
      f'{images.shape}. {spec["preprocessing"]}.'
    )
  return images


def _read_metadata(directory: str) -> dict:
  path = os.path.join(directory, DETECTOR_JSON)
  if not os.path.isfile(path):
    raise ExportError(
      f'no {path}: export a trained run with `python main.py --workdir=RUN --mode=export`.'
    )
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise ExportError(f'{path} is not valid JSON ({e}): export again.') from e
  if not isinstance(meta, dict) or meta.get('detector_version') != DETECTOR_VERSION:
    raise ExportError(
      f'{path} is not a version-{DETECTOR_VERSION} detector description; export again '
      'with this version of skipganomaly_jax.'
    )
  return meta


def _read_model(directory: str, meta: dict, fmt: str) -> bytes:
  entry = meta['models'].get(fmt)
  if entry is None:
    raise ExportError(
      f'{directory} holds no {fmt} model (has {sorted(meta["models"])}); export it with '
      f'`--mode=export --format={fmt}`.'
    )
  path = os.path.join(directory, entry['file'])
  if not os.path.isfile(path):
    raise ExportError(f'{path} is missing (listed in {DETECTOR_JSON}): export again.')
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) != entry['bytes']:
    raise ExportError(
      f'{path} is truncated or altered: {len(data)} bytes, {DETECTOR_JSON} says '
      f'{entry["bytes"]}. Copy it again or export again.'
    )
  if hashlib.sha256(data).hexdigest() != entry['sha256']:
    raise ExportError(
      f'{path} is corrupt: its sha256 differs from the one in {DETECTOR_JSON}. '
      'Copy it again or export again.'
    )
  return data


def load_exported(directory: str, fmt: str | None = None) -> ExportedDetector:
  """Loads an export written by `export_run`, checking every file first.

  Args:
    directory: the export directory (e.g. 'runs/demo/export').
    fmt: 'stablehlo' or 'onnx'; None = stablehlo if present, else onnx.

  Returns:
    An `ExportedDetector`.

  Raises:
    ExportError: a missing, truncated or corrupt detector.json or model file (checked
      against the size and sha256 that detector.json records), or one that does not
      deserialize.
  """
  meta = _read_metadata(directory)
  fmt = fmt or ('stablehlo' if 'stablehlo' in meta['models'] else 'onnx')
  if fmt not in FORMATS:
    raise ExportError(f'format must be one of {FORMATS}; got {fmt!r}.')
  data = _read_model(directory, meta, fmt)
  try:
    if fmt == 'stablehlo':
      exported = jax.export.deserialize(bytearray(data))
      run = lambda x: np.asarray(exported.call(x))
    else:
      import onnxruntime  # noqa: PLC0415

      session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
      run = lambda x: session.run(['scores'], {'images': x})[0]
  except ImportError as e:
    raise ExportError("scoring ONNX models needs onnxruntime: pip install -e '.[onnx]'") from e
  except Exception as e:  # Deserialisers raise anything from struct.error to RuntimeError.
    raise ExportError(
      f'{os.path.join(directory, FILENAMES[fmt])} does not load ({type(e).__name__}: '
      f'{str(e)[:300]}); it was written by jax {meta["versions"]["jax"]}, this is jax '
      f'{jax.__version__}. Export again.'
    ) from e
  return ExportedDetector(meta, fmt, run)
