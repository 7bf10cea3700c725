"""PNG figures of an evaluation: ROC curve, score histogram, reconstruction grid.

Figures are drawn on `matplotlib.figure.Figure` objects with an explicit Agg canvas, not
through `pyplot`: no global backend is selected, no figure is registered with pyplot's
state, and nothing needs closing, so this works headless and in threads.
"""

import contextlib
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def _one_plot(path: str | os.PathLike, figsize: tuple, title: str, **legend) -> Iterator[Any]:
  """Yields the axes of a one-plot figure; then titles it, adds the legend (`legend`:
  its arguments) and saves it as a PNG at `path` (not when the body raises)."""
  fig = Figure(figsize=figsize)
  ax = fig.add_subplot()
  yield ax
  ax.set_title(title)
  ax.legend(**legend)
  fig.tight_layout()
  _save(fig, path)


def save_roc_curve(
  path: str | os.PathLike,
  labels: Any,
  scores: Any,
  title: str,
  score_name: str = 'anomaly score',
) -> None:
  """Saves the ROC curve of anomaly scores (abnormal = positive) as a PNG.

  Args:
    path: output PNG path.
    labels: 1-D array-like of 0 (normal) / 1 (abnormal).
    scores: 1-D array-like of anomaly scores, higher = more anomalous.
    title: figure title.
    score_name: what the scores are (e.g. 'map_topk'); names the curve in the legend.
  """
  fpr, tpr, _ = metrics.roc_curve(labels, scores)
  auc = metrics.auroc(labels, scores)
  with _one_plot(path, (5, 5), title, loc='lower right') as ax:
    ax.plot(fpr, tpr, color='darkorange', lw=2, label=f'{score_name} (AUROC = {auc:.4f})')
    ax.plot([0, 1], [0, 1], color='grey', lw=1, ls='--', label='chance')
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='False positive rate', ylabel='True positive rate')


def save_score_histogram(
  path: str | os.PathLike,
  labels: Any,
  scores: Any,
  threshold: float | None,
  title: str,
  score_name: str = 'anomaly score',
) -> None:
  """Saves overlaid histograms of normal and abnormal scores, with the threshold.

  Args:
    path, labels, scores, title: as `save_roc_curve`.
    threshold: the decision threshold, drawn as a vertical line (None: not drawn).
    score_name: what the scores are (e.g. 'map_topk'); the x axis is named after it.
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
  with _one_plot(path, (6, 4), title) as ax:
    for value, name, color in ((0, 'normal', 'tab:blue'), (1, 'abnormal', 'tab:red')):
      subset = scores[labels == value]
      if subset.size:
        ax.hist(subset, bins=bins, alpha=0.55, color=color, label=f'{name} (n={subset.size})')
    if threshold is not None:
      ax.axvline(threshold, color='black', ls='--', lw=1.5, label=f'threshold = {threshold:.4g}')
    ax.set(xlabel=f'{score_name} (higher = more anomalous)', ylabel='test images')


def _to_display(images: np.ndarray) -> np.ndarray:
  """Maps NHWC images in [-1, 1] to [0, 1]; one channel becomes NHW (grey)."""
  images = np.clip((np.asarray(images, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return images[..., 0] if images.shape[-1] == 1 else images


MAX_KINDS = 12  # Most abnormal columns a figure gets when covering the kinds.


def pick_examples(labels: Any, num_per_class: int = 4, kinds: Any = None) -> np.ndarray:
  """Indices of the columns of a figure: normal examples, then abnormal ones.

  Args:
    labels: (N,) 0 (normal) / 1 (abnormal).
    num_per_class: the first `num_per_class` normal images; as many abnormal ones.
    kinds: None, or (N,) the kind of each image (its defect folder or class): the
      abnormal columns then go round-robin over the abnormal kinds (in name order), one
      column per kind at least (up to MAX_KINDS kinds), so every kind present is shown.

  Returns:
    int indices: the normal columns, then the abnormal ones.
  """
  labels = np.asarray(labels)
  normal = np.flatnonzero(labels == 0)[:num_per_class]
  abnormal, num_abnormal = np.flatnonzero(labels == 1), num_per_class
  if kinds is not None and abnormal.size:
    kinds = np.asarray(kinds)
    groups = [abnormal[kinds[abnormal] == k] for k in sorted(set(kinds[abnormal].tolist()))]
    num_abnormal = max(num_per_class, min(len(groups), MAX_KINDS))
    longest = max(map(len, groups))
    abnormal = np.array([g[i] for i in range(longest) for g in groups if i < len(g)])
  return np.concatenate([normal, abnormal[:num_abnormal]]).astype(int)


def decision(score: float, threshold: float | None) -> str:
  """'anomalous' above the threshold, else 'normal' ('' without a threshold)."""
  if threshold is None:
    return ''
  return 'anomalous' if score > threshold else 'normal'


def column_title(name: str, score: float, threshold: float | None) -> str:
  """A figure column's title: the image's kind, its score and the decision on it."""
  verdict = decision(score, threshold)
  return f'{name}\nscore {score:.3g}' + (f'\n-> {verdict}' if verdict else '')


def save_reconstruction_grid(
  path: str | os.PathLike,
  images: Any,
  reconstructions: Any,
  anomaly_maps: Any,
  labels: Any,
  scores: Any,
  num_per_class: int = 4,
  *,
  kinds: Any = None,
  threshold: float | None = None,
  vmax: float | None = None,
  map_label: str = 'anomaly map',
  score_name: str | None = None,
) -> None:
  """Saves a grid: one column per image; rows input, reconstruction, anomaly map.

  Args:
    path: output PNG path.
    images: (N, H, W, C) floats in [-1, 1], C = 1 or 3.
    reconstructions: generator outputs, same shape as `images`.
    anomaly_maps: (N, H, W) or (N, H, W, 1) per-pixel anomaly maps (a run's: its
      localisation map in units of the normal level, `localisation.display_maps`),
      drawn with the 'hot' colormap on one scale, [0, vmax].
    labels: (N,) 0 (normal) / 1 (abnormal).
    scores: (N,) anomaly scores, shown above each column.
    num_per_class: how many normal and (at least) how many abnormal images to show.
    kinds: None or (N,) each image's kind (defect folder or class): names the columns,
      and the abnormal columns cover every kind (`pick_examples`).
    threshold: the run's threshold: each column says its decision (score > threshold).
    vmax: the top of the map scale (None: the largest map value shown).
    map_label: the map row's name and colour bar label.
    score_name: the score shown (e.g. "paper score"), named in the figure's title with
      the threshold.
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
  idx = pick_examples(labels, num_per_class, kinds)
  if idx.size == 0:
    raise ValueError('no images to show')
  if kinds is None:
    names = np.where(labels[idx] == 1, 'abnormal', 'normal')
  else:
    names = np.asarray(kinds)[idx]
  titles = [column_title(str(n), s, threshold) for n, s in zip(names, scores[idx], strict=True)]
  _draw_grid(
    path,
    _to_display(images[idx]),
    _to_display(recons[idx]),
    maps[idx],
    labels[idx],
    titles,
    vmax if vmax else (float(maps[idx].max()) if maps[idx].max() > 0 else 1.0),
    map_label,
    _grid_title(score_name, threshold),
  )


def _grid_title(score_name: str | None, threshold: float | None) -> str | None:
  """What the column scores are and where the decision falls, or None."""
  if score_name is None:
    return None
  rule = '' if threshold is None else f'; anomalous = score > {threshold:.4g}'
  return f"scores: {score_name} (the run's score){rule}"


def _draw_grid(path, images, recons, maps, labels, titles, vmax, map_label, title=None) -> None:
  """Draws the 3-row grid of `save_reconstruction_grid` on already-selected columns."""
  cols = images.shape[0]
  fig = Figure(figsize=(1.25 * cols + 1.5, 4.9))
  if title:
    fig.suptitle(title, fontsize=8, y=0.995)
  axes = fig.subplots(3, cols, squeeze=False)
  fig.subplots_adjust(
    left=0.6 / fig.get_figwidth(),
    right=1 - 0.9 / fig.get_figwidth(),
    bottom=0.02,
    top=0.87,
    wspace=0.08,
    hspace=0.08,
  )
  cmap_img = 'gray' if images.ndim == 3 else None
  hot = matplotlib.colormaps['hot']
  for j in range(cols):
    axes[0, j].imshow(images[j], cmap=cmap_img, vmin=0.0, vmax=1.0)
    axes[1, j].imshow(recons[j], cmap=cmap_img, vmin=0.0, vmax=1.0)
    heat = axes[2, j].imshow(maps[j], cmap=hot, vmin=0.0, vmax=vmax)
    axes[0, j].set_title(titles[j], fontsize=7, color='tab:red' if labels[j] == 1 else 'tab:blue')
    for i in range(3):
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
  for i, row_name in enumerate(('input', 'reconstruction', map_label)):
    axes[i, 0].set_ylabel(row_name, fontsize=8 if i < 2 else 7)
  # Colorbar in its own axes beside the last map, so that every row keeps its size.
  pos = axes[2, -1].get_position()
  cax = fig.add_axes((pos.x1 + 0.01, pos.y0, 0.12 / fig.get_figwidth(), pos.height))
  fig.colorbar(heat, cax=cax)
  _save(fig, path)
