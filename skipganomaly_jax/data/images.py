"""Image decoding and geometry: any PIL-readable image -> uint8 (isize, isize, nc).

Geometry follows the reference's transform (torchvision `Resize(isize)` then
`CenterCrop(isize)`): the shorter side is resized to isize (bilinear) and the centre is
cropped. Channels are converted to nc (1: ITU-R 601-2 luma as PIL's 'L'; 3: RGB; alpha is
dropped, as the reference's `convert('RGB')` does); mixed inputs are converted, not rejected.
"""

import concurrent.futures
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from skipganomaly_jax.config import ALLOWED_NC, check_geometry

# The extensions torchvision's ImageFolder accepts (case-insensitive).
IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')
_CHUNK = 256  # Images per thread-pool task.


def to_float(images):
  """Scales uint8 images to float32 in [-1, 1]: the one uint8 -> float conversion.

  Args:
    images: uint8 array with values in [0, 255], any shape; numpy or jax (also traced).

  Returns:
    float32 array of the same shape and kind: 0 -> -1.0, 255 -> 1.0.
  """
  if not hasattr(images, 'astype'):
    images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'to_float expects uint8 images in [0, 255], got dtype {images.dtype}.')
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def check_batch_shape(shape, isize: int, nc: int) -> None:
  """Raises ValueError unless `shape` is an NHWC batch (N, isize, isize, nc), N >= 0.

  The error names the likely mistake: a single image without its batch axis, a
  channel-first (NCHW) batch, or images of another size or channel count.
  """
  shape, expected = tuple(shape), f'(N, {isize}, {isize}, {nc})'
  if len(shape) != 4:
    raise ValueError(
      f'images must be a batch of rank 4 {expected} (NHWC); got shape {shape}. Add a '
      'batch axis with images[None] for a single image.'
    )
  if shape[1] in ALLOWED_NC and shape[2:] == (isize, isize) and shape[3] != nc:
    raise ValueError(
      f'images of shape {shape} look channel-first (NCHW); expected NHWC {expected}: '
      'transpose with x.transpose(0, 2, 3, 1).'
    )
  if shape[1:3] != (isize, isize):
    raise ValueError(
      f'images must be {isize}x{isize} pixels, shape {expected}; got {shape[1]}x{shape[2]} '
      f'(shape {shape}). Resize them first (skipganomaly_jax.data.input_pipeline.load_images '
      'resizes and centre-crops image files).'
    )
  if shape[3] != nc:
    raise ValueError(
      f'images must have {nc} channel(s), shape {expected}; got {shape[3]} (shape {shape}).'
    )


def _value_range(dtype, value_range):
  """((low, high), guard): the range images of `dtype` are stated or assumed to lie in."""
  integer = np.issubdtype(dtype, np.integer) and dtype != np.bool_
  if isinstance(value_range, str):
    if value_range != 'auto':
      raise ValueError(f"value_range must be 'auto' or (low, high); got {value_range!r}.")
    if dtype == np.uint8:
      return (0, 255), False
    if np.issubdtype(dtype, np.floating):
      return (-1, 1), True  # Assumed, not stated: guard against [0, 1] images.
    raise ValueError(f'images must be uint8 in [0, 255] or float in [-1, 1]; got {dtype}.')
  if not (integer or np.issubdtype(dtype, np.floating)):
    raise ValueError(f'images must be integers or floats; got {dtype}.')
  try:
    low, high = value_range
  except (TypeError, ValueError):
    raise ValueError(f'value_range must be (low, high); got {value_range!r}.') from None
  if _concrete(low, high) and not float(low) < float(high):
    raise ValueError(f'value_range must be (low, high) with low < high; got {value_range!r}.')
  return (low, high), False


def _concrete(*values) -> bool:
  """True when every value is a Python or numpy number (not traced by jax)."""
  return all(isinstance(v, int | float | np.number) for v in values)


def _check_values(host: np.ndarray, low, high, guard: bool) -> None:
  """The value checks of `as_model_input` on a concrete batch."""
  if np.issubdtype(host.dtype, np.floating) and not np.all(np.isfinite(host)):
    bad = np.unique(np.argwhere(~np.isfinite(host))[:, 0])
    raise ValueError(f'images contain NaN or Inf values (images {bad[:10].tolist()}).')
  if host.size == 0:
    return
  lo, hi = float(host.min()), float(host.max())
  slack = 5e-4 * (float(high) - float(low))  # Rounding of a float conversion.
  if lo < float(low) - slack or hi > float(high) + slack:
    if guard:
      raise ValueError(
        f'float images must be scaled to [-1, 1]; got values in [{lo:.3g}, {hi:.3g}]. '
        'Pass uint8 images in [0, 255], scale with x / 127.5 - 1, or state their range, '
        'e.g. value_range=(0, 255).'
      )
    raise ValueError(
      f'images must lie in value_range=({low}, {high}); got values in [{lo:.3g}, {hi:.3g}].'
    )
  if guard and lo >= 0:
    raise ValueError(
      f'float images are all non-negative (values in [{lo:.3g}, {hi:.3g}]): they look '
      'scaled to [0, 1], which would be scored wrongly (the networks take [-1, 1]). Pass '
      'value_range=(0, 1) to have them rescaled, or value_range=(-1, 1) if they are '
      '[-1, 1] images that happen to have no negative values.'
    )


def as_model_input(images, isize: int, nc: int, value_range='auto'):
  """Checks a batch of images and returns it as the networks take it: float32 in [-1, 1].

  Args:
    images: (N, isize, isize, nc) NHWC array, numpy or jax (also traced under jax.jit).
    isize: expected height and width.
    nc: expected channels.
    value_range: 'auto' (uint8 are [0, 255]; floats must be in [-1, 1], and an all-
      non-negative float batch is rejected as the likely [0, 1] mistake) or (low, high),
      the stated range of the values, mapped linearly to [-1, 1] (e.g. (0, 1)).

  Returns:
    float32 images in [-1, 1]: numpy for numpy input, else a jax array.

  Raises:
    ValueError: a wrong shape (names NCHW, a missing batch axis, size, channels) or
      dtype; on concrete values also NaN/Inf, values outside the range, or the [0, 1]
      guard. Traced values (under jax.jit) get the shape and dtype checks only.
  """
  if not hasattr(images, 'dtype'):
    images = np.asarray(images)
  check_batch_shape(np.shape(images), isize, nc)
  (low, high), guard = _value_range(np.dtype(images.dtype), value_range)
  if not _is_traced(images):
    if not isinstance(images, np.ndarray):
      images = np.asarray(images)
    _check_values(images, low, high, guard)
  if _concrete(low, high) and (low, high) == (0, 255) and images.dtype == np.uint8:
    return to_float(images)
  if _concrete(low, high) and (low, high) == (-1, 1):
    return images.astype(np.float32)
  scaled = (images.astype(np.float32) - low) * (2.0 / (high - low)) - 1.0
  return scaled.astype(np.float32)


def _is_traced(images) -> bool:
  """True for abstract values inside jax transformations (their values are unknown)."""
  import jax  # noqa: PLC0415  (only when scoring; the data pipeline itself is numpy)

  return isinstance(images, jax.core.Tracer)


def _convert_mode(img: Image.Image, nc: int) -> Image.Image:
  """Converts any PIL mode (gray, RGB(A), palette, 16-bit, CMYK, ...) to 'L' or 'RGB'."""
  if img.mode.startswith('I;16'):
    img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), 'L')
  elif img.mode in ('I', 'F'):
    arr = np.asarray(img, np.float64)
    if arr.max(initial=0) > 255:  # 16-bit content stored as 32-bit.
      arr = arr / 257.0
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), 'L')
  elif img.mode == 'P':
    img = img.convert('RGBA')  # Palette transparency is applied before dropping alpha.
  mode = 'L' if nc == 1 else 'RGB'
  return img if img.mode == mode else img.convert(mode)


def _resize_center_crop(img: Image.Image, isize: int) -> Image.Image:
  """Shorter side to isize (bilinear), then the central isize x isize crop."""
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


def preprocessing_contract(isize: int, nc: int) -> dict:
  """What `read_image` does to an image file, in words a reimplementation can follow.

  detector.json's input contract (deploy/export.py); examples/load_exported.py follows
  it with PIL alone, and tests/test_maps_and_contract.py checks the two agree.
  """
  mode = 'L' if nc == 1 else 'RGB'
  return {
    'decode': 'PIL.Image.open(file), then .load(); any mode, any size',
    'channels': {
      'to': f"PIL mode '{mode}' ({nc} channel{'s' if nc > 1 else ''})",
      'rgb_to_grey': (
        "PIL Image.convert('L'): ITU-R 601-2 luma, L = R * 299/1000 + G * 587/1000 + "
        "B * 114/1000 in PIL's fixed-point arithmetic, rounded"
      ),
      'grey_to_rgb': (
        "PIL Image.convert('RGB'): the grey value in R, G and B; a grey ('L') image is "
        'resized and cropped first, then converted'
      ),
      'alpha': 'dropped by the conversion (not composited on a background)',
      'palette': "('P') converted to 'RGBA' first (palette transparency), then as above",
      'grey_16_bit': "('I;16*') value >> 8, as 'L'",
      'integer_or_float_32_bit': (
        "('I', 'F') divided by 257 when any value exceeds 255, then rounded and clipped "
        "to [0, 255], as 'L'"
      ),
    },
    'resize': {
      'method': 'bilinear',
      'call': 'PIL Image.resize((new_w, new_h), PIL.Image.Resampling.BILINEAR)',
      'size': (
        f'the shorter side to {isize}, the longer to max({isize}, int({isize} * longer / '
        f'shorter)) (truncated; width when w <= h); an image already {isize}x{isize} is '
        'not resized'
      ),
      'when': 'after the channel conversion, before the crop',
    },
    'crop': {
      'kind': f'centre crop to {isize}x{isize}, after the resize',
      'box': (
        f'left = int(round((new_w - {isize}) / 2)), top = int(round((new_h - {isize}) / 2)) '
        f'(Python round: halves to even); PIL Image.crop((left, top, left + {isize}, '
        f'top + {isize}))'
      ),
    },
    'to_array': f'numpy.asarray(image, uint8).reshape({isize}, {isize}, {nc}); batch on axis 0',
    'scaling': 'none: the model takes uint8 [0, 255] and computes x / 127.5 - 1 in float32',
  }


def preprocess(img: Image.Image, isize: int, nc: int) -> np.ndarray:
  """Converts a decoded PIL image to a uint8 (isize, isize, nc) array.

  Args:
    img: a PIL image of any mode and size.
    isize: output height and width.
    nc: output channels, 1 or 3.

  Returns:
    uint8 array of shape (isize, isize, nc).
  """
  if img.mode == 'L' and nc == 3:  # Resize one channel, then replicate it.
    img = _resize_center_crop(img, isize).convert('RGB')
  else:
    img = _resize_center_crop(_convert_mode(img, nc), isize)
  return np.asarray(img, dtype=np.uint8).reshape(isize, isize, nc)


def preprocess_array(arr: np.ndarray, isize: int, nc: int) -> np.ndarray:
  """`preprocess` for a uint8 HW / HWC array (C in 1, 3, 4); a no-copy path when it fits."""
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.shape[:2] == (isize, isize):
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if channels == nc:
      return arr.reshape(isize, isize, nc)
    if channels == 1 and nc == 3:  # Same as PIL's L -> RGB.
      return np.repeat(arr[..., None], 3, axis=-1)
  return preprocess(Image.fromarray(arr), isize, nc)


def read_image(path: str, isize: int, nc: int) -> np.ndarray:
  """Decodes one image file; a corrupt or unreadable file raises ValueError naming it."""
  try:
    with Image.open(path) as img:
      img.load()
      return preprocess(img, isize, nc)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'Cannot read image file {path}: {e}. Delete or replace this file.') from e


def list_images(folder: str) -> list[str]:
  """Image files under folder (recursive, sorted; hidden files and other extensions skipped)."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
      if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(dirpath, name))
  return sorted(paths)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
  """[fn(x) for x in items] on a thread pool (PIL releases the GIL while decoding).

  The first exception is re-raised and the tasks not yet started are cancelled.
  """
  if len(items) <= _CHUNK:
    return [fn(x) for x in items]
  workers = min(16, 2 * (os.cpu_count() or 1))
  chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(lambda c: [fn(x) for x in c], c) for c in chunks]
    out = []
    try:
      for future in futures:
        out.extend(future.result())
    except BaseException:
      for future in futures:
        future.cancel()
      raise
  return out


def stack(arrays: Sequence[np.ndarray], isize: int, nc: int) -> np.ndarray:
  """Stacks HWC uint8 arrays into NHWC (an empty (0, isize, isize, nc) array if none)."""
  if not arrays:
    return np.zeros((0, isize, isize, nc), np.uint8)
  return np.stack(arrays)


def read_images(paths: Sequence[str], isize: int, nc: int) -> np.ndarray:
  """Decodes image files in parallel into a uint8 (N, isize, isize, nc) array."""
  return stack(parallel_map(lambda p: read_image(p, isize, nc), list(paths)), isize, nc)


def load_images(path: str, isize: int, nc: int) -> tuple[np.ndarray, list[str]]:
  """Loads a single image file, or every image under a folder (recursive), for scoring.

  Args:
    path: an image file or a folder.
    isize: output height and width.
    nc: output channels, 1 or 3.

  Returns:
    (uint8 array (N, isize, isize, nc), the N file paths in the same order).

  Raises:
    FileNotFoundError: path does not exist.
    ValueError: a folder without images, or a corrupt image (the message names it).
  """
  check_geometry(isize, nc)
  path = os.fspath(path)
  if os.path.isfile(path):
    paths = [path]
  elif os.path.isdir(path):
    paths = list_images(path)
    if not paths:
      raise ValueError(
        f'No image files ({", ".join(IMAGE_EXTENSIONS)}) found under {path}. '
        'Point to a folder that contains images.'
      )
  else:
    raise FileNotFoundError(f'No such image file or folder: {path}')
  return read_images(paths, isize, nc), paths
