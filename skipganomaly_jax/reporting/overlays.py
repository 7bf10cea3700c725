"""Anomaly maps drawn on images: localisation.png, and the overlays of `--mode=score --maps`.

localisation.png: one column per test image (a few normal, then defective ones covering
every defect kind), titled with the run's image score and its decision; rows: the input
with the mask contour (cyan), and the anomaly map with the same contour, on the fixed
'hot' scale [0, localisation.DISPLAY_MAX] in units of the normal level (the map divided by
the 99.9th percentile of the validation normals' map pixels; `localisation.display_maps`),
the same map and scale as reconstructions.png and `--maps`. Drawn as plots.py does: an
explicit Agg canvas, no pyplot state.

`overlay_image`: one image with its map blended on it as colour and a legend (PIL, no
figure), for `--maps`.
"""

import math
import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from skipganomaly_jax.data import mvtec
from skipganomaly_jax.reporting import plots
from skipganomaly_jax.scoring import localisation

FILENAME = 'localisation.png'
MAP_LABEL = f'anomaly map\n(1 = {localisation.UNIT_NAME})'
OVERLAY_CMAP = 'jet'
OVERLAY_ALPHA = 0.6  # The colour's opacity at DISPLAY_MAX; proportional to the map below.
OVERLAY_SIDE = 256  # Overlays are upscaled (bilinear, integer factor) to at least this.


def pick(labels: np.ndarray, kinds, num: int) -> np.ndarray:
  """The first `num` normal images, then defective ones covering the kinds (`plots`)."""
  return plots.pick_examples(labels, num, kinds)


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
  axes[1, 0].set_ylabel(MAP_LABEL, fontsize=7)
  pos = axes[1, -1].get_position()
  fig.colorbar(heat, cax=fig.add_axes((pos.x1 + 0.01, pos.y0, 0.015, pos.height)))
  os.makedirs(os.path.dirname(os.fspath(path)) or '.', exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format='png', dpi=100)


def write_overlays(
  workdir: str,
  settings: localisation.Settings,
  variables,
  splits,
  test_scores=None,
  calibration=None,
  scale: localisation.MapScale | None = None,
) -> str | None:
  """Writes workdir/localisation.png for a few test images; None without masks.

  Args:
    workdir: the run's folder.
    settings: the run's localisation settings.
    variables: host copies of the scoring variables.
    splits: the run's `DataSplits` (with test_masks).
    test_scores: the run's scores of `splits.test` (the score its threshold applies to);
      None: the map maximum (in units of the normal level) is shown instead.
    calibration: the run's `metrics.Calibration`: each column says its decision.
    scale: the maps' `MapScale` (None: computed from `splits.val`).
  """
  if splits.test_masks is None:
    return None
  kinds = mvtec.defect_kinds(splits)
  idx = pick(splits.test_labels, kinds, settings.num_overlays)
  scale = scale or localisation.map_scale(variables, splits.val, settings)
  maps = localisation.display_maps(variables, splits.test[idx], settings, scale)
  names = (
    kinds[idx] if kinds is not None else np.where(splits.test_labels[idx], 'abnormal', 'normal')
  )
  if test_scores is None:
    titles = [f'{n}\nmap max {m.max():.3g}' for n, m in zip(names, maps, strict=True)]
  else:
    threshold = None if calibration is None else calibration.threshold
    scores = np.asarray(test_scores, np.float64)[idx]
    titles = [plots.column_title(str(n), s, threshold) for n, s in zip(names, scores, strict=True)]
  path = os.path.join(workdir, FILENAME)
  save_overlays(
    path, splits.test[idx], maps, splits.test_masks[idx], titles, localisation.DISPLAY_MAX
  )
  return path


# ----------------------------------------------------------------------------- --maps overlays


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType.
    return ImageFont.load_default()


def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
  """(H, W) or (H, W, C) float array, each channel upscaled `factor` times (bilinear)."""
  if factor == 1:
    return array
  planes = array[..., None] if array.ndim == 2 else array
  h, w = planes.shape[:2]
  out = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(planes[..., c], np.float32), 'F').resize(
        (w * factor, h * factor), Image.Resampling.BILINEAR
      )
    )
    for c in range(planes.shape[-1])
  ]
  return np.stack(out, -1) if array.ndim == 3 else out[0]


def overlay_image(image, amap, vmax: float = localisation.DISPLAY_MAX) -> Image.Image:
  """One image with its anomaly map blended on it, and a colour legend below.

  The colour is the 'jet' colormap of min(map, vmax) / vmax, blended over the image
  with opacity OVERLAY_ALPHA * min(map, vmax) / vmax (transparent at 0, so normal regions
  show the image as it is). Image and map are upscaled by an integer factor (bilinear) to
  at least OVERLAY_SIDE pixels.

  Args:
    image: uint8 (H, W, C) with C 1 or 3: the image as the model saw it.
    amap: (H, W) the map in units of the normal level (`localisation.display_maps`).
    vmax: the top of the colour scale.

  Returns:
    An RGB PIL image, (H * f + legend) x (W * f).
  """
  image, amap = np.asarray(image), np.asarray(amap, np.float32)
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or amap.shape != image.shape[:2]:
    raise ValueError(f'image {image.shape} (H, W, 1 or 3) and map {amap.shape} (H, W) mismatch')
  factor = max(1, math.ceil(OVERLAY_SIDE / max(amap.shape)))
  rgb = _upscale(np.repeat(image, 3 // image.shape[-1], -1).astype(np.float32), factor)
  level = np.clip(_upscale(amap, factor) / vmax, 0.0, 1.0)
  cmap = matplotlib.colormaps[OVERLAY_CMAP]
  alpha = (OVERLAY_ALPHA * level)[..., None]
  blended = (1 - alpha) * rgb + alpha * 255.0 * cmap(level)[..., :3]
  body = Image.fromarray(np.uint8(np.clip(np.rint(blended), 0, 255)), 'RGB')
  return _with_legend(body, cmap, vmax)


def _with_legend(body: Image.Image, cmap, vmax: float) -> Image.Image:
  """`body` above a legend: the colour bar from 0 to vmax, ticks, and the unit."""
  width, font = body.width, _font(11)
  pad, bar_h = 8, 10
  out = Image.new('RGB', (width, body.height + 48), 'white')
  out.paste(body, (0, 0))
  bar = cmap(np.linspace(0.0, 1.0, width - 2 * pad))[None, :, :3]
  bar = Image.fromarray(np.uint8(np.rint(255 * np.repeat(bar, bar_h, 0))), 'RGB')
  top = body.height + 4
  out.paste(bar, (pad, top))
  draw = ImageDraw.Draw(out)
  step = 0.5 if vmax <= 3 else 1.0
  ticks = np.arange(0.0, vmax + 1e-9, step)
  for t in ticks:
    x = pad + round(t / vmax * (width - 2 * pad - 1))
    draw.line([(x, top + bar_h), (x, top + bar_h + 3)], fill='black')
    label = f'{t:g}+' if t == ticks[-1] and t == vmax else f'{t:g}'
    draw.text((x, top + bar_h + 3), label, fill='black', font=font, anchor='ma')
  draw.text(
    (width - pad, body.height + 33),
    f'anomaly map, 1 = {localisation.UNIT_NAME}',
    fill='black',
    font=font,
    anchor='rt',
  )
  return out
