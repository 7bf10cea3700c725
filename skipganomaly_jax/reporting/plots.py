"""PNG figures of an evaluation: ROC curve, score histogram, reconstruction grid.

Figures are drawn on `matplotlib.figure.Figure` objects with an explicit Agg canvas, not
through `pyplot`: no global backend is selected, no figure is registered with pyplot's
state, and nothing needs closing, so this works headless and in threads.
"""

import os
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipganomaly_jax.scoring import metrics

_DPI = 100


def _save(fig: Figure, path: str | os.PathLike) -> None:
  """Renders `fig` with the Agg canvas to a PNG at `path`, creating parent folders."""
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format='png', dpi=_DPI)


def save_roc_curve(path: str | os.PathLike, labels: Any, scores: Any, title: str) -> None:
  """Saves the ROC curve of anomaly scores (abnormal = positive) as a PNG.

  Args:
    path: output PNG path.
    labels: 1-D array-like of 0 (normal) / 1 (abnormal).
    scores: 1-D array-like of anomaly scores, higher = more anomalous.
    title: figure title; the AUROC is appended.
  """
  fpr, tpr, _ = metrics.roc_curve(labels, scores)
  auc = metrics.auroc(labels, scores)
  fig = Figure(figsize=(5, 5))
  ax = fig.add_subplot()
  ax.plot(fpr, tpr, color='darkorange', lw=2, label=f'ROC (AUROC = {auc:.4f})')
  ax.plot([0, 1], [0, 1], color='grey', lw=1, ls='--', label='chance')
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='False positive rate', ylabel='True positive rate')
  ax.set_title(title)
  ax.legend(loc='lower right')
  fig.tight_layout()
  _save(fig, path)


def save_score_histogram(
  path: str | os.PathLike, labels: Any, scores: Any, threshold: float | None, title: str
) -> None:
  """Saves overlaid histograms of normal and abnormal scores, with the threshold.

  Args:
    path: output PNG path.
    labels: 1-D array-like of 0 (normal) / 1 (abnormal).
    scores: 1-D array-like of anomaly scores.
    threshold: the decision threshold, drawn as a vertical line (None: not drawn).
    title: figure title.
  """
  labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
  if labels.shape != scores.shape or scores.ndim != 1 or scores.size == 0:
    raise ValueError(f'labels {labels.shape} and scores {scores.shape} must be 1-D, same length')
  if not np.isfinite(scores).all():
    raise ValueError('scores contain NaN or infinite values')
  lo, hi = scores.min(), scores.max()
  if threshold is not None:
    lo, hi = min(lo, threshold), max(hi, threshold)
  bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 51)
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for value, name, color in ((0, 'normal', 'tab:blue'), (1, 'abnormal', 'tab:red')):
    subset = scores[labels == value]
    if subset.size:
      ax.hist(subset, bins=bins, alpha=0.55, color=color, label=f'{name} (n={subset.size})')
  if threshold is not None:
    ax.axvline(threshold, color='black', ls='--', lw=1.5, label=f'threshold = {threshold:.4g}')
  ax.set(xlabel='anomaly score', ylabel='count')
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  _save(fig, path)


def _to_display(images: np.ndarray) -> np.ndarray:
  """Maps NHWC images in [-1, 1] to [0, 1]; one channel becomes NHW (grey)."""
  images = np.clip((np.asarray(images, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return images[..., 0] if images.shape[-1] == 1 else images


def pick_examples(labels: Any, num_per_class: int = 4) -> np.ndarray:
  """Indices of the first `num_per_class` normal, then abnormal, examples (the grid's)."""
  labels = np.asarray(labels)
  normal = np.flatnonzero(labels == 0)[:num_per_class]
  abnormal = np.flatnonzero(labels == 1)[:num_per_class]
  return np.concatenate([normal, abnormal])


def save_reconstruction_grid(
  path: str | os.PathLike,
  images: Any,
  reconstructions: Any,
  anomaly_maps: Any,
  labels: Any,
  scores: Any,
  num_per_class: int = 4,
) -> None:
  """Saves a grid: one column per image; rows input, reconstruction, anomaly map.

  Args:
    path: output PNG path.
    images: (N, H, W, C) floats in [-1, 1], C = 1 or 3.
    reconstructions: generator outputs, same shape as `images`.
    anomaly_maps: (N, H, W) or (N, H, W, 1) per-pixel anomaly maps (e.g. mean over
      channels of (x - x_hat)^2, `scores.anomaly_map`), drawn with the 'hot' colormap
      on one shared scale.
    labels: (N,) 0 (normal) / 1 (abnormal).
    scores: (N,) anomaly scores, shown above each column.
    num_per_class: how many normal and how many abnormal images to show (the first ones).
  """
  images, recons = np.asarray(images), np.asarray(reconstructions)
  maps = np.asarray(anomaly_maps, dtype=np.float32)
  labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be NHWC with 1 or 3 channels, got shape {images.shape}')
  if recons.shape != images.shape:
    raise ValueError(f'reconstructions {recons.shape} differ from images {images.shape}')
  maps = maps[..., 0] if maps.ndim == 4 and maps.shape[-1] == 1 else maps
  if maps.shape != images.shape[:3]:
    raise ValueError(f'anomaly_maps {maps.shape} do not match images {images.shape[:3]}')
  if labels.shape != (images.shape[0],) or scores.shape != (images.shape[0],):
    raise ValueError(f'labels {labels.shape} and scores {scores.shape} need ({images.shape[0]},)')
  idx = pick_examples(labels, num_per_class)
  if idx.size == 0:
    raise ValueError('no images to show')
  _draw_grid(
    path, _to_display(images[idx]), _to_display(recons[idx]), maps[idx], labels[idx], scores[idx]
  )


def _draw_grid(path, images, recons, maps, labels, scores) -> None:
  """Draws the 3-row grid of `save_reconstruction_grid` on already-selected columns."""
  cols = images.shape[0]
  vmax = float(maps.max()) if maps.max() > 0 else 1.0
  fig = Figure(figsize=(1.25 * cols + 1.5, 4.6))
  axes = fig.subplots(3, cols, squeeze=False)
  fig.subplots_adjust(
    left=0.6 / fig.get_figwidth(),
    right=1 - 0.9 / fig.get_figwidth(),
    bottom=0.02,
    top=0.9,
    wspace=0.08,
    hspace=0.08,
  )
  cmap_img = 'gray' if images.ndim == 3 else None
  hot = matplotlib.colormaps['hot']
  for j in range(cols):
    axes[0, j].imshow(images[j], cmap=cmap_img, vmin=0.0, vmax=1.0)
    axes[1, j].imshow(recons[j], cmap=cmap_img, vmin=0.0, vmax=1.0)
    heat = axes[2, j].imshow(maps[j], cmap=hot, vmin=0.0, vmax=vmax)
    name = 'abnormal' if labels[j] == 1 else 'normal'
    axes[0, j].set_title(
      f'{name}\nscore {scores[j]:.3g}',
      fontsize=8,
      color='tab:red' if labels[j] == 1 else 'tab:blue',
    )
    for i in range(3):
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
  for i, row_name in enumerate(('input', 'reconstruction', 'anomaly map')):
    axes[i, 0].set_ylabel(row_name, fontsize=8)
  # Colorbar in its own axes beside the last map, so that every row keeps its size.
  pos = axes[2, -1].get_position()
  cax = fig.add_axes((pos.x1 + 0.01, pos.y0, 0.12 / fig.get_figwidth(), pos.height))
  fig.colorbar(heat, cax=cax)
  _save(fig, path)
