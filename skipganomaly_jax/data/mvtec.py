"""MVTec AD layout with pixel masks (one category per root), and masks for folder datasets.

MVTec AD (Bergmann et al., CVPR 2019) publishes each category as

  ROOT/train/good/*.png                      normal training images
  ROOT/test/good/*.png                       normal test images
  ROOT/test/<defect>/*.png                   defective test images, one folder per kind
  ROOT/ground_truth/<defect>/<name>_mask.png their masks (0 background, 255 defect)

Masks go through the same geometry as their images (shorter side resized to isize, the
centre cropped; nearest-neighbour instead of bilinear) and are binarised (> 127). A
defective image without its mask, or with a mask of another size, is an error naming the
file; `good` test images have all-zero masks. The reference's folder layout
(`ROOT/test/{0.normal,1.abnormal}`) takes optional masks the same way:
`ROOT/ground_truth/1.abnormal/<name>_mask.png`, required for every abnormal test image
once `ROOT/ground_truth/` exists.
"""

import os

import numpy as np
from PIL import Image

from skipganomaly_jax.config import DataSpec
from skipganomaly_jax.data import images as images_lib
from skipganomaly_jax.data import splits as splits_lib

MVTEC = 'mvtec'
GOOD = 'good'
MASK_SUFFIX = '_mask.png'
_LAYOUT = 'ROOT/train/good/, ROOT/test/good/, ROOT/test/<defect>/, ROOT/ground_truth/<defect>/'


def mask_geometry(width: int, height: int, isize: int) -> tuple[tuple[int, int], tuple]:
  """The resize and crop of `images._resize_center_crop`: ((w, h) resized, crop box)."""
  if width <= height:
    nw, nh = isize, max(isize, int(isize * height / width))
  else:
    nw, nh = max(isize, int(isize * width / height)), isize
  left, top = int(round((nw - isize) / 2.0)), int(round((nh - isize) / 2.0))
  return (nw, nh), (left, top, left + isize, top + isize)


def read_mask(path: str, image_size: tuple[int, int], isize: int) -> np.ndarray:
  """Reads a mask as bool (isize, isize), resized and cropped as its image.

  Args:
    path: the mask file.
    image_size: (width, height) of its image, which the mask must match.
    isize: output side.

  Raises:
    ValueError: unreadable mask, or a size that differs from its image's (both named).
  """
  try:
    with Image.open(path) as img:
      mask = img.convert('L')
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f'Cannot read mask file {path}: {e}.') from e
  if mask.size != tuple(image_size):
    raise ValueError(
      f'Mask {path} is {mask.size[0]}x{mask.size[1]} but its image is '
      f'{image_size[0]}x{image_size[1]}: a mask must have its image size.'
    )
  if mask.size != (isize, isize):
    size, box = mask_geometry(*mask.size, isize)
    mask = mask.resize(size, Image.Resampling.NEAREST).crop(box)
  return np.asarray(mask) > 127


def mask_path(root: str, image_path: str) -> str:
  """ROOT/ground_truth/<kind>/<name>_mask.png for ROOT/test/<kind>/<name>.<ext>."""
  kind = os.path.basename(os.path.dirname(image_path))
  stem = os.path.splitext(os.path.basename(image_path))[0]
  return os.path.join(root, 'ground_truth', kind, stem + MASK_SUFFIX)


def read_masks(root: str, paths, defective, isize: int) -> np.ndarray:
  """uint8 (N, isize, isize) masks in {0, 1}: read for defective images, zero otherwise.

  Raises:
    FileNotFoundError: a defective image has no mask (names the image and the mask).
  """
  masks = np.zeros((len(paths), isize, isize), np.uint8)
  for i, (path, bad) in enumerate(zip(paths, defective, strict=True)):
    if not bad:
      continue
    expected = mask_path(root, path)
    if not os.path.isfile(expected):
      raise FileNotFoundError(
        f'Defective test image {path} has no mask: expected {expected}. Every image under '
        'ROOT/test/<defect>/ needs ROOT/ground_truth/<defect>/<name>_mask.png.'
      )
    with Image.open(path) as img:
      size = img.size
    masks[i] = read_mask(expected, size, isize)
  return masks


def _test_folders(root: str) -> list[str]:
  test = os.path.join(root, 'test')
  kinds = sorted(
    k for k in os.listdir(test) if os.path.isdir(os.path.join(test, k)) and not k.startswith('.')
  )
  if GOOD not in kinds or len(kinds) < 2:
    raise FileNotFoundError(
      f'{test} must hold good/ and at least one defect folder (found {kinds}); MVTec AD '
      f'layout: {_LAYOUT}'
    )
  return [GOOD] + [k for k in kinds if k != GOOD]


def _list(folder: str) -> list[str]:
  files = images_lib.list_images(folder)
  if not files:
    raise ValueError(f'No image files under {folder} (MVTec AD layout: {_LAYOUT}).')
  return files


def load_splits(ds: DataSpec) -> splits_lib.DataSplits:
  """Reads one MVTec AD category (ds.root) with its masks.

  Args:
    ds: the run's data spec: root, category, seed, val_fraction, isize, nc and
      batch_size; the category folder is root/category (root itself when category is '').

  Returns:
    `DataSplits` with test_masks (N, isize, isize) uint8 and test_paths; test normals
    ('good') first, then the defect folders in name order; abnormal_name lists the kinds.
  """
  isize, nc = ds.isize, ds.nc
  root = os.path.join(ds.root, ds.category) if ds.root else ds.root
  if not root or not os.path.isdir(os.path.join(root, 'train', GOOD)):
    raise FileNotFoundError(
      f'MVTec AD category folder {root!r} has no train/good/. Set --config.dataset.root '
      '(e.g. /data/mvtec_ad) and --config.dataset.category (e.g. carpet) so that '
      f'root/category is laid out as {_LAYOUT}'
    )
  kinds = _test_folders(root)
  test_paths = [p for k in kinds for p in _list(os.path.join(root, 'test', k))]
  labels = np.array([os.path.basename(os.path.dirname(p)) != GOOD for p in test_paths], np.int32)
  masks = read_masks(root, test_paths, labels, isize)  # Checks every mask before decoding.
  train = images_lib.read_images(_list(os.path.join(root, 'train', GOOD)), isize, nc)
  train, val = splits_lib.validation_slice(train, ds.val_fraction, ds.seed)
  if len(train) < ds.batch_size:
    raise ValueError(
      f'Only {len(train)} training images (after holding out {len(val)} for validation) '
      f'for a global batch of {ds.batch_size}: lower --config.batch_size.'
    )
  return splits_lib.DataSplits(
    train=train,
    val=val,
    test=images_lib.read_images(test_paths, isize, nc),
    test_labels=labels,
    abnormal_name=','.join(kinds[1:]),
    test_paths=tuple(test_paths),
    test_masks=masks,
  )


def folder_masks(root: str, test_paths, test_labels, isize: int) -> np.ndarray | None:
  """Masks of a folder dataset's test images, or None without ROOT/ground_truth/."""
  if not test_paths or not os.path.isdir(os.path.join(root, 'ground_truth')):
    return None
  return read_masks(root, test_paths, np.asarray(test_labels) == 1, isize)


def defect_kinds(splits: splits_lib.DataSplits) -> np.ndarray:
  """The folder name ('good', 'scratch', ...) of each test image (None without paths)."""
  if splits.test_paths is None:
    return None
  return np.array([os.path.basename(os.path.dirname(p)) for p in splits.test_paths])
