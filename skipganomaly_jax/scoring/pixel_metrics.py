"""Localisation metrics on per-pixel anomaly maps: pixel AUROC and PRO (MVTec AD).

- Pixel AUROC: the ROC AUC over every pixel of every test image (defect pixels positive),
  sklearn's definition, ties included (`metrics.auroc` on the flattened maps).
- PRO (per-region overlap), as MVTec AD defines it (Bergmann et al., IJCV 2021): the
  ground-truth masks are split into connected components (8-connectivity), each image
  separately. At a threshold t, PRO(t) is the mean over all components of the fraction
  of the component's pixels scoring >= t, and FPR(t) is the fraction of defect-free
  pixels (of all test images) scoring >= t. The metric is the area under PRO(FPR) from
  FPR 0 to `max_fpr` (0.3), the curve linearly interpolated at `max_fpr`, divided by
  `max_fpr`: 1 is perfect; a random map gives about max_fpr / 2.
"""

from typing import Any

import numpy as np
from scipy import ndimage

from skipganomaly_jax.scoring import metrics

MAX_FPR = 0.3  # MVTec AD's integration limit.
_EIGHT_CONNECTED = np.ones((3, 3), int)


def check_maps_and_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates (N, H, W) anomaly maps and binary masks of the same shape.

  Returns:
    (maps as float64, masks as bool).

  Raises:
    ValueError: shapes differ or are not (N, H, W), non-finite map values, masks with
      values other than 0/1 (or 0/255), or no defect / no defect-free pixel at all.
  """
  maps, masks = np.asarray(maps), np.asarray(masks)
  if maps.ndim != 3 or maps.shape != masks.shape:
    raise ValueError(
      f'anomaly maps and masks must both be (N, H, W) of the same shape; got {maps.shape} '
      f'and {masks.shape}.'
    )
  maps = maps.astype(np.float64)
  if not np.all(np.isfinite(maps)):
    raise ValueError('anomaly maps contain NaN or Inf values.')
  if masks.dtype != bool:
    values = np.unique(masks)
    if not np.isin(values, [0, 1, 255]).all():
      raise ValueError(f'masks must be binary (0/1 or 0/255); found values {values[:10]}.')
    masks = masks > 0
  if not masks.any() or masks.all():
    raise ValueError(
      'pixel metrics need both defect and defect-free pixels; the masks have '
      f'{int(masks.sum())} defect pixels of {masks.size}.'
    )
  return maps, masks


def pixel_auroc(maps: Any, masks: Any) -> float:
  """AUROC of all pixels of all images, defect pixels positive (= sklearn's).

  Args:
    maps: (N, H, W) anomaly maps, higher = more anomalous.
    masks: (N, H, W) binary ground truth (bool, 0/1 or 0/255).

  Returns:
    The pixel AUROC in [0, 1].
  """
  maps, masks = check_maps_and_masks(maps, masks)
  return metrics.auroc(masks.ravel().astype(np.int64), maps.ravel())


def pro_curve(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
  """The PRO curve: (fpr, pro) at every distinct map value as a threshold (>=).

  Each defect pixel adds 1 / (its component's size * the number of components) to PRO
  when the threshold passes its value, each defect-free pixel adds 1 / (the number of
  defect-free pixels) to FPR; sorting all pixels once gives the whole curve. Equal map
  values are one threshold (the curve jumps over them together).

  Args:
    maps: (N, H, W) anomaly maps.
    masks: (N, H, W) binary ground truth.

  Returns:
    (fpr, pro), increasing, starting at (0, 0) and ending at (1, 1).
  """
  maps, masks = check_maps_and_masks(maps, masks)
  pro_weight = np.zeros(maps.shape, np.float64)
  num_regions = 0
  for i, mask in enumerate(masks):
    labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count:
      sizes = np.bincount(labelled.ravel())  # sizes[0] counts the background.
      region = labelled > 0
      pro_weight[i][region] = 1.0 / sizes[labelled[region]]
      num_regions += count
  order = np.argsort(maps.ravel(), kind='stable')[::-1]
  sorted_scores = maps.ravel()[order]
  fpr = np.cumsum(~masks.ravel()[order]) / np.count_nonzero(~masks)
  pro = np.cumsum(pro_weight.ravel()[order]) / num_regions
  last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
  fpr, pro = np.minimum(fpr[last_of_tie], 1.0), np.minimum(pro[last_of_tie], 1.0)
  return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Trapezoidal area under y(x) from x[0] to x_max, y interpolated linearly at x_max.

  Args:
    x: non-decreasing abscissae (x[0] <= x_max <= x[-1]).
    y: the curve's values at x.
    x_max: the upper integration limit.

  Returns:
    The area.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  inside = x <= x_max
  xs, ys = x[inside], y[inside]
  if xs[-1] < x_max:  # Close the area exactly at x_max (x increases past it).
    j = np.searchsorted(x, x_max, side='right')
    t = (x_max - x[j - 1]) / (x[j] - x[j - 1])
    xs, ys = np.r_[xs, x_max], np.r_[ys, y[j - 1] + t * (y[j] - y[j - 1])]
  return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def pro_score(maps: Any, masks: Any, max_fpr: float = MAX_FPR) -> float:
  """PRO: the area under the PRO curve up to FPR max_fpr, normalised by max_fpr.

  Args:
    maps: (N, H, W) anomaly maps, higher = more anomalous.
    masks: (N, H, W) binary ground truth (images without defects count for FPR only).
    max_fpr: the integration limit (MVTec AD: 0.3).

  Returns:
    The normalised area in [0, 1].
  """
  if not 0.0 < max_fpr <= 1.0:
    raise ValueError(f'max_fpr must be in (0, 1]; got {max_fpr!r}.')
  fpr, pro = pro_curve(maps, masks)
  return area_up_to(fpr, pro, max_fpr) / max_fpr


def evaluate_pixels(maps: Any, masks: Any, max_fpr: float = MAX_FPR) -> dict[str, float]:
  """{'pixel_auroc': ..., 'pro': ...} of test maps against their masks."""
  return {'pixel_auroc': pixel_auroc(maps, masks), 'pro': pro_score(maps, masks, max_fpr)}
