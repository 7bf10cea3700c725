"""MVTec AD (Bergmann et al. 2019), one category per run, with pixel masks.

Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (a
licence form; ~5 GB) and extract it, e.g. to /data/mvtec_ad, so that
/data/mvtec_ad/carpet/{train/good, test/good, test/<defect>, ground_truth/<defect>} exist.
Command (category = carpet, grid, leather, tile, wood, bottle, cable, capsule, hazelnut,
metal_nut, pill, screw, toothbrush, transistor or zipper):
  python main.py --config=configs/mvtec.py --workdir=runs/mvtec_carpet \
      --config.dataset.root=/data/mvtec_ad --config.dataset.category=carpet
Images are resized to 256 px (shorter side, then centre crop; masks by nearest
neighbour), RGB; 5% of train/good is held out for calibration. Reports image AUROC,
pixel AUROC and PRO up to FPR 0.3 (metrics.json, TensorBoard, printed), overlays in
localisation.png. Gray categories (grid, screw, zipper) are converted to RGB; add
--config.nc=1 to train on one channel. Batch 16: MVTec categories have 60-400 training
images, so batch 64 would give few steps per epoch; batch 64 also fits (estimated 15 GiB of
host memory at 256 px on CPU; benchmarks/results/resolution.md). About 0.6 training
images/s on a 2-core CPU at 256 px: use a GPU.
Result: not measured here (no internet to download MVTec AD).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'mvtec'
  config.dataset.root = ''  # Required: --config.dataset.root=/path/to/mvtec_ad.
  config.dataset.category = 'carpet'
  config.isize = 256
  config.nc = 3
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 15
  config.score_kind = 'map_max'
  config.localisation.map = 'rec'
  config.localisation.sigma = 4.0  # The common choice at 256 px.
  return config
