"""Localisation demo, offline: one texture of the seeded scikit-image dataset, 64x64x1.

Make the data once (a few seconds; brick, grass and gravel, MVTec AD layout):
  python -m skipganomaly_jax.data.textures --out data/textures
Command:
  python main.py --config=configs/textures.py --workdir=runs/textures_brick
  (--config.dataset.category=grass or gravel for the other textures)
Data: 240 normal 128 px crops (228 train, 12 validation), test 30 normal + 15 each of
patch, shift, scratch and blob defects with exact masks, resized to 64 px.
Model: the paper's U-Net and D at ngf=ndf=32 (CPU-sized), EPOCHS epochs.
Prints image AUROC, pixel AUROC and PRO (FPR <= 0.3); localisation.png shows maps and
mask contours. Results per texture and defect kind: benchmarks/results/localisation.md.
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
  config.score_kind = 'map_max'
  config.localisation.map = 'rec'
  config.localisation.sigma = 1.0
  return config
