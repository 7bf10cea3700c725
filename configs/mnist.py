"""MNIST from TFDS, GANomaly's protocol: one digit abnormal, seeded 80/20 split.

Prepare once (needs internet and TensorFlow):
  pip install -e .[prepare] && python -m skipganomaly_jax.prepare_data mnist
Command:
  python main.py --config=configs/mnist.py --workdir=runs/mnist_0 \
      --config.dataset.abnormal_class=0
Images 28x28 -> 32x32 (bilinear), 1 channel, [-1, 1]; default model (ngf=ndf=64), 15 epochs.
Result: not measured here (this machine has no internet to prepare TFDS MNIST); the
offline 5,000-digit subset is measured in benchmarks/results/quality.md.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'mnist'
  config.dataset.protocol = 'ganomaly'
  config.dataset.abnormal_class = '0'
  config.nc = 1
  return config
