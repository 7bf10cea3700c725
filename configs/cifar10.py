"""CIFAR-10 from TFDS, one class abnormal (the paper's protocol), 32x32x3.

Prepare once (needs internet and TensorFlow):
  pip install -e .[prepare] && python -m skipganomaly_jax.prepare_data cifar10
Command:
  python main.py --config=configs/cifar10.py --workdir=runs/cifar10_automobile \
      --config.dataset.abnormal_class=automobile
Train = the nine normal classes' training images (minus a 5% validation slice); test =
their test images + all 6,000 images of the abnormal class. Default model, 15 epochs.
Result: not measured here (no internet to prepare CIFAR-10); the paper reports AUROC
0.953 for 'automobile' under its own protocol (test-set model selection, see README).
CIFAR-10 (or any images) already in an .npz, no TFDS: configs/cifar10_arrays.py.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'cifar10'
  config.dataset.protocol = 'one_class'
  config.dataset.abnormal_class = 'automobile'
  config.nc = 3
  return config
