"""A seeded MVTec-AD-layout dataset made from real texture photographs, offline.

scikit-image ships three 512x512 grayscale photographs: brick, grass and gravel. For each,
normal images are random crops; defective test images are other crops with a synthetic
defect and its exact mask, in the spirit of CutPaste (Li et al. 2021) and DRAEM (Zavrtanik
et al. 2021):

- 'patch': a rectangle of another texture, matched to the crop's mean and standard
  deviation (it differs by structure, not brightness);
- 'shift': a rectangle of the same texture from elsewhere, rotated by 90 degrees;
- 'scratch': a straight line 2-4 px wide (at the 128 px crop), brighter or darker;
- 'blob': an irregular region (thresholded smooth noise) made brighter or darker.

Training crops come from the top 5/8 of each photograph and test crops (normal and
defective) from the rest, so no test pixel was seen in training. Written as
`OUT/<texture>/{train/good, test/good, test/<kind>, ground_truth/<kind>/<name>_mask.png}`:
one MVTec AD category per texture (`config.dataset.name='mvtec'`, `root=OUT/<texture>`).

    python -m skipganomaly_jax.data.textures --out data/textures
"""

import argparse
import os

import numpy as np
from PIL import Image
from scipy import ndimage

TEXTURES = ('brick', 'grass', 'gravel')
DEFECT_KINDS = ('patch', 'shift', 'scratch', 'blob')
PHOTO_SIZE = 512
TRAIN_ROWS = 320  # Training crops lie in rows [0, 320); test crops in [320, 512).


def photo(name: str) -> np.ndarray:
  """The uint8 (512, 512) photograph `name` shipped with scikit-image."""
  if name not in TEXTURES:
    raise ValueError(f'Unknown texture {name!r}; choose from {TEXTURES}.')
  try:
    import skimage.data  # Lazy: only the generator needs scikit-image.
  except ImportError as e:
    raise ImportError('The texture generator needs scikit-image: pip install scikit-image') from e
  image = np.asarray(getattr(skimage.data, name)(), np.uint8)
  if image.ndim == 3:
    image = np.asarray(Image.fromarray(image).convert('L'))
  return image


def random_crop(rng: np.random.Generator, image: np.ndarray, size: int, rows: tuple[int, int]):
  """A size x size crop whose rows lie in [rows[0], rows[1])."""
  y = int(rng.integers(rows[0], rows[1] - size + 1))
  x = int(rng.integers(0, image.shape[1] - size + 1))
  return image[y : y + size, x : x + size].copy()


def _rectangle(rng, size: int) -> tuple[slice, slice]:
  h, w = rng.integers(size // 8, size // 4 + 1, size=2)
  y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
  return slice(int(y), int(y + h)), slice(int(x), int(x + w))


def _paste(crop, source, rng):
  """Pastes a rectangle of `source` (same size as crop) at a random place of crop."""
  ys, xs = _rectangle(rng, crop.shape[0])
  h, w = ys.stop - ys.start, xs.stop - xs.start
  sy = int(rng.integers(0, source.shape[0] - h + 1))
  sx = int(rng.integers(0, source.shape[1] - w + 1))
  out, mask = crop.astype(np.float64), np.zeros(crop.shape, bool)
  out[ys, xs] = source[sy : sy + h, sx : sx + w]
  mask[ys, xs] = True
  return out, mask


def defect_patch(rng, crop, textures, name):
  """A rectangle of another texture, matched to the crop's mean and spread."""
  other = photo(str(rng.choice([t for t in textures if t != name] or [name])))
  piece = other.astype(np.float64)
  piece = (piece - piece.mean()) / max(piece.std(), 1e-6) * crop.std() + crop.mean()
  return _paste(crop, piece, rng)


def defect_shift(rng, crop, textures, name):
  """A rectangle of the same photograph from elsewhere, rotated by 90 degrees."""
  del textures
  return _paste(crop, np.rot90(photo(name)), rng)


def defect_scratch(rng, crop, textures, name):
  """A straight line 2-4 px wide across part of the crop, brighter or darker."""
  del textures, name
  size = crop.shape[0]
  a = rng.uniform(0.1, 0.9, size=2) * size
  angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.6) * size
  b = a + length * np.array([np.sin(angle), np.cos(angle)])
  yy, xx = np.mgrid[:size, :size] + 0.5
  p = np.stack([yy, xx], -1) - a
  t = np.clip(p @ (b - a) / np.dot(b - a, b - a), 0.0, 1.0)
  distance = np.linalg.norm(p - t[..., None] * (b - a), axis=-1)
  mask = distance <= rng.uniform(1.0, 2.0)
  out = crop.astype(np.float64)
  out[mask] = rng.choice([25.0, 230.0]) + rng.normal(0, 8, size=int(mask.sum()))
  return out, mask


def defect_blob(rng, crop, textures, name):
  """An irregular smooth-edged region of changed intensity (exact mask)."""
  del textures, name
  size = crop.shape[0]
  noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 16)
  cy, cx = rng.uniform(0.25, 0.75, size=2) * size
  yy, xx = np.mgrid[:size, :size]
  radius = rng.uniform(0.08, 0.16) * size
  field = noise / noise.std() * 0.35 + 1.0 - np.hypot(yy - cy, xx - cx) / radius
  mask = field > 0
  if not mask.any():
    mask[int(cy), int(cx)] = True
  out = crop.astype(np.float64)
  out[mask] += rng.choice([-1.0, 1.0]) * rng.uniform(35, 60)
  return out, mask


DEFECTS = {
  'patch': defect_patch,
  'shift': defect_shift,
  'scratch': defect_scratch,
  'blob': defect_blob,
}


def _save(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).save(path)


def generate_texture(
  out: str,
  name: str,
  *,
  crop: int = 128,
  num_train: int = 240,
  num_test_good: int = 30,
  num_per_kind: int = 15,
  kinds=DEFECT_KINDS,
  seed: int = 0,
) -> dict[str, int]:
  """Writes one texture as an MVTec AD category under `out/name`.

  Args:
    out: the dataset folder (the category goes to out/name).
    name: 'brick', 'grass' or 'gravel'.
    crop: side of every image, in pixels of the photograph (<= 192).
    num_train: normal training images.
    num_test_good: normal test images.
    num_per_kind: defective test images of each kind.
    kinds: the defect kinds (a subset of DEFECT_KINDS).
    seed: seeds everything (`np.random.default_rng([seed, texture index])`).

  Returns:
    The number of images written per folder ('train/good', 'test/<kind>', ...).
  """
  if not 16 <= crop <= PHOTO_SIZE - TRAIN_ROWS:
    raise ValueError(f'crop must be in [16, {PHOTO_SIZE - TRAIN_ROWS}]; got {crop}.')
  unknown = set(kinds) - set(DEFECT_KINDS)
  if unknown:
    raise ValueError(f'Unknown defect kinds {sorted(unknown)}; choose from {DEFECT_KINDS}.')
  image = photo(name)
  rng = np.random.default_rng([seed, TEXTURES.index(name)])
  root, counts = os.path.join(out, name), {}
  train_rows, test_rows = (0, TRAIN_ROWS), (TRAIN_ROWS, PHOTO_SIZE)
  for i in range(num_train):
    _save(
      os.path.join(root, 'train', 'good', f'{i:03d}.png'), random_crop(rng, image, crop, train_rows)
    )
  for i in range(num_test_good):
    _save(
      os.path.join(root, 'test', 'good', f'{i:03d}.png'), random_crop(rng, image, crop, test_rows)
    )
  counts['train/good'], counts['test/good'] = num_train, num_test_good
  for kind in kinds:
    for i in range(num_per_kind):
      base = random_crop(rng, image, crop, test_rows).astype(np.float64)
      defective, mask = DEFECTS[kind](rng, base, TEXTURES, name)
      _save(os.path.join(root, 'test', kind, f'{i:03d}.png'), defective)
      _save(os.path.join(root, 'ground_truth', kind, f'{i:03d}_mask.png'), mask * 255.0)
    counts[f'test/{kind}'] = num_per_kind
  return counts


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output folder (one category per texture)')
  parser.add_argument('--textures', default=','.join(TEXTURES), help='comma-separated')
  parser.add_argument('--crop', type=int, default=128, help='image side in photo pixels')
  parser.add_argument('--num_train', type=int, default=240)
  parser.add_argument('--num_test_good', type=int, default=30)
  parser.add_argument('--num_per_kind', type=int, default=15)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  for name in args.textures.split(','):
    counts = generate_texture(
      args.out,
      name,
      crop=args.crop,
      num_train=args.num_train,
      num_test_good=args.num_test_good,
      num_per_kind=args.num_per_kind,
      seed=args.seed,
    )
    print(f'{os.path.join(args.out, name)}: {counts}')


if __name__ == '__main__':
  main()
