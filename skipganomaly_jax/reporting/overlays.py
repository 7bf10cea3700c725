"""Overlay PNG of localisation: input, anomaly map and ground-truth mask contour.

One column per test image (a few normal, then a few defective ones); rows: the input with
the mask contour (cyan), and the anomaly map with the same contour, on one 'hot' scale
whose top is the larger of the validation normals' 99.9th percentile and half the largest
value shown (so a normal image's map looks as dark as it should). Drawn as plots.py does:
an explicit Agg canvas, no pyplot state.
"""

import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipganomaly_jax.data import mvtec
from skipganomaly_jax.scoring import localisation

FILENAME = 'localisation.png'


def pick(labels: np.ndarray, kinds, num: int) -> np.ndarray:
  """The first `num` normal images, then `num` defective ones spread over the kinds."""
  normal = np.flatnonzero(labels == 0)[:num]
  bad = np.flatnonzero(labels == 1)
  if kinds is not None and len(bad):  # Round-robin over the defect kinds.
    groups = [bad[kinds[bad] == k] for k in sorted(set(kinds[bad]))]
    bad = np.array([g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)])
  return np.concatenate([normal, bad[:num]]).astype(int)


def save_overlays(path, images, maps, masks, titles, vmax: float | None = None) -> None:
  """Saves the 2-row grid (input + contour, map + contour) for already-picked images.

  Args:
    path: output PNG.
    images: uint8 (N, H, W, C) inputs.
    maps: (N, H, W) anomaly maps.
    masks: (N, H, W) binary masks (all zero for normal images).
    titles: N column titles.
    vmax: top of the map colour scale (default: the largest map value).
  """
  images, maps, masks = np.asarray(images), np.asarray(maps), np.asarray(masks)
  if images.ndim != 4 or maps.shape != images.shape[:3] or masks.shape != maps.shape:
    raise ValueError(f'images {images.shape}, maps {maps.shape}, masks {masks.shape} mismatch')
  cols = len(images)
  vmax = float(vmax or maps.max() or 1.0)
  fig = Figure(figsize=(1.6 * cols + 1.0, 3.6))
  axes = fig.subplots(2, cols, squeeze=False)
  fig.subplots_adjust(left=0.02, right=0.9, bottom=0.02, top=0.86, wspace=0.06, hspace=0.06)
  shown = images[..., 0] if images.shape[-1] == 1 else images
  for j in range(cols):
    axes[0, j].imshow(shown[j], cmap='gray' if shown.ndim == 3 else None, vmin=0, vmax=255)
    heat = axes[1, j].imshow(maps[j], cmap=matplotlib.colormaps['hot'], vmin=0.0, vmax=vmax)
    for i in range(2):
      if masks[j].any():
        axes[i, j].contour(masks[j].astype(float), levels=[0.5], colors='cyan', linewidths=0.8)
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
    axes[0, j].set_title(titles[j], fontsize=7)
  axes[0, 0].set_ylabel('input + mask', fontsize=8)
  axes[1, 0].set_ylabel('anomaly map', fontsize=8)
  pos = axes[1, -1].get_position()
  fig.colorbar(heat, cax=fig.add_axes((pos.x1 + 0.01, pos.y0, 0.015, pos.height)))
  os.makedirs(os.path.dirname(os.fspath(path)) or '.', exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format='png', dpi=100)


def write_overlays(workdir: str, settings: localisation.Settings, variables, splits) -> str | None:
  """Writes workdir/localisation.png for a few test images; None without masks.

  Args:
    workdir: the run's folder.
    settings: the run's localisation settings.
    variables: host copies of the scoring variables.
    splits: the run's `DataSplits` (with test_masks).
  """
  if splits.test_masks is None:
    return None
  kinds = mvtec.defect_kinds(splits)
  idx = pick(splits.test_labels, kinds, settings.num_overlays)
  d_levels = settings.d_levels if settings.map == 'rec+d' else 0
  val_terms = localisation.map_terms(variables, splits.val, d_levels)
  scale = localisation.term_scale(val_terms)
  val_maps = localisation.combine(val_terms, settings, scale)
  maps = localisation.anomaly_maps(variables, splits.test[idx], settings, scale)
  scores = localisation.image_scores(maps, 'map_max')
  names = (
    kinds[idx] if kinds is not None else np.where(splits.test_labels[idx], 'abnormal', 'normal')
  )
  titles = [f'{n}\nmax {s:.3g}' for n, s in zip(names, scores, strict=True)]
  path = os.path.join(workdir, FILENAME)
  vmax = max(float(np.percentile(val_maps, 99.9)), float(np.max(maps)) / 2)
  save_overlays(path, splits.test[idx], maps, splits.test_masks[idx], titles, vmax)
  return path
