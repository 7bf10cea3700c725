"""Localisation demo, offline: one texture of the seeded scikit-image dataset, 64x64x1.

Make the data once (a few seconds; brick, grass and gravel, MVTec AD layout):
  python -m skipganomaly_jax.data.textures --out data/textures
Command:
  python main.py --config=configs/textures.py --workdir=runs/textures_brick
  (--config.dataset.category=grass or gravel for the other textures)
Data: 240 normal 128 px crops (228 train, 12 validation), test 30 normal + 15 each of
patch, shift, scratch and blob defects with exact masks, resized to 64 px.
Model: the paper's U-Net and D at ngf=ndf=32 (CPU-sized), batch 32, 15 epochs (105 steps).
Map: reconstruction error + D-feature differences (2 levels, validation-normal units),
Gaussian sigma 2 px, image score = mean of the top 1% of map pixels ('map_topk'): the best
mean pixel AUROC / PRO of the variants measured (benchmarks/results/localisation.md).
Expected (brick, seed 0): image AUROC 0.850 (map_topk; the paper score 0.899), pixel
AUROC 0.921, PRO 0.821 (benchmarks/results/textures_brick_run.json; no-network baseline:
0.626, 0.660, 0.395); grass and gravel are harder (benchmarks/results/localisation.md,
which predates BatchNorm parity, 4920baf, and has not been rerun).
Brick took 4 min 48 s on this project's 2-core CPU while other jobs shared it (5-15 min
seen; compilation and an evaluation after every epoch included).
Prints image AUROC, pixel AUROC and PRO (FPR <= 0.3); localisation.png shows maps and
mask contours.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'mvtec'
  config.dataset.root = 'data/textures'
  config.dataset.category = 'brick'
  config.isize = 64
  config.nc = 1
  config.model.ngf = 32
  config.model.ndf = 32
  config.batch_size = 32
  config.num_epochs = 15
  config.log_every_steps = 7
  config.score_kind = 'map_topk'
  config.localisation.map = 'rec+d'
  config.localisation.sigma = 2.0
  return config
