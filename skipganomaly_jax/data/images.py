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

# The extensions torchvision's ImageFolder accepts (case-insensitive).
IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')
_CHUNK = 256  # Images per thread-pool task.


def check_geometry(isize: int, nc: int) -> None:
  """Raises ValueError unless isize is a positive int and nc is 1 or 3."""
  if isinstance(isize, bool) or not isinstance(isize, int) or isize < 1:
    raise ValueError(f'config.isize must be a positive integer, got {isize!r}.')
  if nc not in (1, 3):
    raise ValueError(f'config.nc must be 1 (grayscale) or 3 (RGB), got {nc!r}.')


def to_float(images: np.ndarray) -> np.ndarray:
  """Scales uint8 images to float32 in [-1, 1].

  Args:
    images: uint8 array with values in [0, 255], any shape.

  Returns:
    float32 array of the same shape: 0 -> -1.0, 255 -> 1.0.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'to_float expects uint8 images in [0, 255], got dtype {images.dtype}.')
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


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
