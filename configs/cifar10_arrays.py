"""CIFAR-10 (or any labelled images) from an .npz file: GANomaly's pooled 80/20 protocol.

Command (e.g. an .npz of CIFAR-10 images you made with numpy.savez):
  python main.py --config=configs/cifar10_arrays.py \
      --config.dataset.path=/path/to/cifar10.npz \
      --workdir=runs/cifar10_automobile --config.dataset.abnormal_class=automobile
The .npz holds images (N, 32, 32, 3) uint8, labels (N,) and class_names (airplane, ...,
truck). Without an 'is_test' array the normal images are pooled, shuffled with
dataset.seed and split 80% train / 20% normal test (GANomaly's protocol); the test set
adds every image of the abnormal class. With 'is_test', --config.dataset.protocol=one_class
uses the file's own split instead. Default model (ngf=ndf=64, nz=100), 15 epochs.
Measured on 3,051 real CIFAR-10 development images, one run per abnormal class:
benchmarks/results/quality_cifar10_dev/quality.md (how it was run: benchmarks/README.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'arrays'
  config.dataset.path = ''  # Required: --config.dataset.path=/path/to/data.npz.
  config.dataset.protocol = 'ganomaly'
  config.dataset.abnormal_class = 'automobile'
  config.nc = 3
  return config
