"""The README's example maps: docs/images/map_example.png and overlay_example.png.

Trains configs/textures.py (brick: the seeded textures of skipganomaly_jax/data/textures.py,
generated if missing; 64x64 grey, 'rec+d' map, sigma 2, map_topk), then scores one
defective test image, the first of --kind, as `python main.py --mode=score --maps` does,
and copies the two PNGs it writes to docs/images/ (the map on its fixed scale; the
overlay with its legend; each with its scale in the PNG's text metadata).

    python benchmarks/example_maps.py              # 5-15 min on 2 shared CPU cores
    python benchmarks/example_maps.py --epochs 2   # quicker, a less trained model
    python benchmarks/example_maps.py --reuse      # redraw from the trained --workdir
"""

import argparse
import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import textures as textures_config  # noqa: E402
from skipganomaly_jax.data import input_pipeline, mvtec, textures  # noqa: E402
from skipganomaly_jax.deploy import run_modes, trained_run  # noqa: E402
from skipganomaly_jax.training import train  # noqa: E402

OUT = ROOT / 'docs' / 'images'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default=str(ROOT / 'data' / 'textures'))
  parser.add_argument('--workdir', default=str(ROOT / 'runs' / 'example_maps'))
  parser.add_argument('--texture', default='brick', choices=textures.TEXTURES)
  parser.add_argument('--kind', default='blob', choices=textures.DEFECT_KINDS)
  parser.add_argument('--epochs', type=int, default=15)
  parser.add_argument('--reuse', action='store_true', help="don't train: use --workdir's run")
  args = parser.parse_args()
  if not os.path.isdir(os.path.join(args.data, args.texture)):
    textures.generate_texture(args.data, args.texture)
  config = textures_config.get_config()
  config.dataset.root, config.dataset.category = args.data, args.texture
  config.num_epochs = args.epochs
  if not args.reuse:
    shutil.rmtree(args.workdir, ignore_errors=True)
    report = train.train_and_evaluate(config, args.workdir)
    print(f'image AUROC {report["auroc"]:.3f}, pixel AUROC {report["pixel_auroc"]:.3f}')
  splits = input_pipeline.load_splits(trained_run.restore(args.workdir).specs.data)
  source = [
    p for p, k in zip(splits.test_paths, mvtec.defect_kinds(splits), strict=True) if k == args.kind
  ][0]
  maps = pathlib.Path(args.workdir) / 'anomaly_maps'
  shutil.rmtree(maps, ignore_errors=True)
  os.chdir(ROOT)  # The PNGs' 'source' metadata: the path relative to the repository.
  run_modes.score_path(args.workdir, os.path.relpath(source, ROOT), write_maps=True)
  OUT.mkdir(parents=True, exist_ok=True)
  for suffix, name in (('_map.png', 'map_example.png'), ('_overlay.png', 'overlay_example.png')):
    (written,) = maps.glob(f'*{suffix}')
    shutil.copy(written, OUT / name)
    print(f'{OUT / name} ({os.path.getsize(OUT / name):,} bytes) from {source}')


if __name__ == '__main__':
  main()
