"""Scores images with an exported detector, without skipganomaly_jax: jax and numpy only.

    python examples/load_exported.py runs/demo/export a.png b.jpg   # scores image files
    python examples/load_exported.py runs/demo/export [N]           # N random images

Needs `pip install jax numpy flatbuffers` (jax.export's deserialiser imports flatbuffers),
and Pillow to read image files (`preprocess`: detector.json's input contract, exactly as
the project reads images for scoring).
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


def _to_mode(img, nc):
  """The channel conversion of detector.json's input['channels'] (PIL modes 'L', 'RGB')."""
  from PIL import Image  # noqa: PLC0415  (only to read files)

  if img.mode.startswith('I;16'):  # 16-bit grey: the high byte.
    img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), 'L')
  elif img.mode in ('I', 'F'):
    values = np.asarray(img, np.float64)
    values = values / 257.0 if values.max(initial=0) > 255 else values
    img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), 'L')
  elif img.mode == 'P':
    img = img.convert('RGBA')  # Palette transparency first; alpha is then dropped.
  mode = 'L' if nc == 1 else 'RGB'
  return img if img.mode == mode else img.convert(mode)


def _resize_centre_crop(img, isize):
  """input['resize'] then input['crop']: shorter side to isize (bilinear), centre crop."""
  from PIL import Image  # noqa: PLC0415

  w, h = img.size
  if (w, h) == (isize, isize):
    return img
  if w <= h:
    nw, nh = isize, max(isize, int(isize * h / w))
  else:
    nw, nh = max(isize, int(isize * w / h)), isize
  img = img.resize((nw, nh), Image.Resampling.BILINEAR)
  left, top = int(round((nw - isize) / 2.0)), int(round((nh - isize) / 2.0))
  return img.crop((left, top, left + isize, top + isize))


def preprocess(path, meta):
  """uint8 (isize, isize, nc) of an image file, as detector.json's input contract says."""
  from PIL import Image  # noqa: PLC0415

  _, isize, _, nc = meta['input']['shape']
  with Image.open(path) as img:
    img.load()
    if img.mode == 'L' and nc == 3:  # Grey for an RGB model: resize, then convert.
      img = _resize_centre_crop(img, isize).convert('RGB')
    else:
      img = _resize_centre_crop(_to_mode(img, nc), isize)
    return np.asarray(img, dtype=np.uint8).reshape(isize, isize, nc)


if __name__ == '__main__':
  detect, meta = load_detector(sys.argv[1])
  if len(sys.argv) > 2 and not sys.argv[2].isdigit():  # Image files.
    images = np.stack([preprocess(path, meta) for path in sys.argv[2:]])
  else:
    shape = [int(sys.argv[2]) if len(sys.argv) > 2 else 4] + meta['input']['shape'][1:]
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  scores, anomalous = detect(images)
  print(json.dumps({'scores': scores.tolist(), 'anomalous': anomalous.tolist()}))
