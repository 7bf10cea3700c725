"""Scores images with an exported detector, without skipganomaly_jax: jax and numpy only.

    python examples/load_exported.py runs/demo/export   # scores random images

Needs `pip install jax numpy flatbuffers` (jax.export's deserialiser imports flatbuffers).
"""

import hashlib
import json
import pathlib
import sys

import jax
import numpy as np


def load_detector(export_dir):
  """Returns detect(images uint8 (N, H, W, C)) -> (scores, anomalous) and detector.json."""
  meta = json.loads((pathlib.Path(export_dir) / 'detector.json').read_text())
  model = meta['models']['stablehlo']
  data = (pathlib.Path(export_dir) / model['file']).read_bytes()
  if hashlib.sha256(data).hexdigest() != model['sha256']:  # A truncated or corrupt copy.
    raise ValueError(f'{model["file"]} does not match the sha256 in detector.json')
  scorer = jax.export.deserialize(bytearray(data))

  def detect(images):
    scores = np.asarray(scorer.call(np.asarray(images)))  # Checks dtype and shape.
    return scores, scores > meta['threshold']

  return detect, meta


if __name__ == '__main__':
  detect, meta = load_detector(sys.argv[1])
  shape = [int(sys.argv[2]) if len(sys.argv) > 2 else 4] + meta['input']['shape'][1:]
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  scores, anomalous = detect(images)
  print(json.dumps({'scores': scores.tolist(), 'anomalous': anomalous.tolist()}))
