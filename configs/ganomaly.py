"""GANomaly (Akcay et al., ACCV 2018), Skip-GANomaly's baseline, on any base config.

The model of the GANomaly paper and its authors' code: G = encoder1 -> decoder ->
encoder2 (no skips), D = a DCGAN encoder as wide as G (model.ndf = model.ngf), trained by
their step (G: adversarial feature L2 x 1 + L1 x 50 + encoder L2 x 1, loss.w_adv / w_con
/ w_enc; D: half the sum of its two BCEs, re-initialised below 1e-5; parity with their
code: tests/test_ganomaly_parity.py) and scored by their score, the distance between
encoder1's code of x and encoder2's code of G(x) (score_kind='paper' is GANomaly's own
for this model; 'latent_knn' uses encoder1's code). Everything else is the base
config's: its data, protocol, widths, epochs and score kind.

Command (the part after ':' names the base config in configs/):
  python main.py --config=configs/ganomaly.py:demo --workdir=runs/ganomaly_demo
  python main.py --config=configs/ganomaly.py:cifar10_arrays \
      --config.dataset.path=/path/to/cifar10.npz --workdir=runs/ganomaly_cifar10
Another width: set both, --config.model.ngf=32 --config.model.ndf=32.
Measured result (configs/ganomaly.py:demo): to be measured.
"""

from configs import load_base


def get_config(base: str = 'cifar10_arrays'):
  """The base config (configs/<base>.py) with GANomaly's networks, step and score."""
  config = load_base('ganomaly', base)
  config.model.name = 'ganomaly'
  config.model.ndf = config.model.ngf  # GANomaly's D is as wide as its G.
  return config
