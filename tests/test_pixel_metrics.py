"""Pixel AUROC against sklearn and PRO against a slow, obviously-correct numpy version."""

import numpy as np
import pytest
from sklearn import metrics as skm

from skipganomaly_jax.scoring import pixel_metrics


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
  """8-connected components of a 2-D bool mask by flood fill (independent of scipy)."""
  seen = np.zeros_like(mask, bool)
  regions = []
  h, w = mask.shape
  for i in range(h):
    for j in range(w):
      if mask[i, j] and not seen[i, j]:
        stack, region = [(i, j)], []
        seen[i, j] = True
        while stack:
          y, x = stack.pop()
          region.append((y, x))
          for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
              v, u = y + dy, x + dx
              if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                seen[v, u] = True
                stack.append((v, u))
        regions.append(region)
  return regions


def _slow_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
  """Thresholds enumerated one by one, overlaps by loops, trapezoids up to max_fpr."""
  regions = [(n, r) for n in range(len(masks)) for r in _components(masks[n])]
  normal_pixels = np.count_nonzero(~masks)
  points = [(0.0, 0.0)]
  for t in sorted(set(maps.ravel().tolist()), reverse=True):
    predicted = maps >= t
    fpr = np.count_nonzero(predicted & ~masks) / normal_pixels
    overlaps = [sum(predicted[n, y, x] for y, x in r) / len(r) for n, r in regions]
    points.append((fpr, sum(overlaps) / len(overlaps)))
  points.append((1.0, 1.0))
  area = 0.0
  for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:  # Cut the last trapezoid at max_fpr, interpolating y there.
      y1 = y0 + (max_fpr - x0) / (x1 - x0) * (y1 - y0)
      x1 = max_fpr
    area += (x1 - x0) * (y0 + y1) / 2
  return area / max_fpr


def _random_case(rng, ties: bool):
  n, h, w = int(rng.integers(2, 5)), int(rng.integers(5, 12)), int(rng.integers(5, 12))
  masks = np.zeros((n, h, w), bool)
  for k in range(n - 1):  # The last image stays defect-free (a 'good' image).
    for _ in range(int(rng.integers(1, 4))):
      y, x = rng.integers(0, h), rng.integers(0, w)
      masks[k, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
  masks[0, 0, 0] = True  # At least one defect pixel; a lone pixel region too sometimes.
  maps = rng.normal(size=masks.shape) + rng.uniform(0, 2) * masks
  if ties:
    maps = np.round(maps * 2) / 2
  return maps, masks


@pytest.mark.parametrize('ties', [False, True])
def test_pro_matches_slow_version(rng, ties):
  for _ in range(15):
    maps, masks = _random_case(rng, ties)
    max_fpr = float(rng.choice([0.3, 0.3, 0.05, 1.0]))
    got = pixel_metrics.pro_score(maps, masks, max_fpr)
    np.testing.assert_allclose(got, _slow_pro(maps, masks, max_fpr), rtol=1e-10, atol=1e-12)


def test_pro_counts_small_regions_as_much_as_large(rng):
  # Two components: a big one found perfectly, a one-pixel one missed. Per-pixel metrics
  # would say ~97% found; PRO averages per region, so its curve sits at 0.5 until FPR 1.
  masks = np.zeros((1, 20, 20), bool)
  masks[0, 2:8, 2:8] = True
  masks[0, 15, 15] = True
  maps = masks.astype(float)
  maps[0, 15, 15] = -1.0
  assert pixel_metrics.pro_score(maps, masks) == pytest.approx(0.5)
  assert pixel_metrics.pro_score(masks.astype(float), masks) == pytest.approx(1.0)


def test_pixel_auroc_matches_sklearn(rng):
  for ties in (False, True):
    maps, masks = _random_case(rng, ties)
    np.testing.assert_allclose(
      pixel_metrics.pixel_auroc(maps, masks),
      skm.roc_auc_score(masks.ravel(), maps.ravel()),
      rtol=1e-12,
    )
  assert pixel_metrics.pixel_auroc(maps, masks.astype(np.uint8) * 255) == pytest.approx(
    skm.roc_auc_score(masks.ravel(), maps.ravel())
  )


def test_bad_inputs():
  masks = np.zeros((2, 4, 4), bool)
  masks[0, 1, 1] = True
  with pytest.raises(ValueError, match='same shape'):
    pixel_metrics.pro_score(np.zeros((2, 4, 5)), masks)
  with pytest.raises(ValueError, match='NaN'):
    pixel_metrics.pixel_auroc(np.full((2, 4, 4), np.nan), masks)
  with pytest.raises(ValueError, match='both defect and defect-free'):
    pixel_metrics.pro_score(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool))
  with pytest.raises(ValueError, match='binary'):
    pixel_metrics.pixel_auroc(np.zeros((2, 4, 4)), masks * 3)
  with pytest.raises(ValueError, match='max_fpr'):
    pixel_metrics.pro_score(np.zeros((2, 4, 4)), masks, max_fpr=0.0)
