"""Trains, evaluates or scores with Skip-GANomaly.

    python main.py --config=configs/demo.py --workdir=runs/demo
    python main.py --config=configs/mnist.py --workdir=runs/mnist \
        --config.dataset.abnormal_class=3 --config.num_epochs=5
    python main.py --config=configs/demo.py --workdir=runs/demo --mode=eval
    python main.py --config=configs/demo.py --workdir=runs/demo --mode=score \
        --images=path/to/folder --maps
    python main.py --workdir=runs/demo --mode=export [--format=onnx]
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.deploy import export, trained_run
from skipganomaly_jax.reporting import log_setup
from skipganomaly_jax.scoring import localisation
from skipganomaly_jax.training import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and outputs.')
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'eval', 'score', 'export'],
  'train (resumes if workdir has checkpoints), eval (rebuild outputs from '
  'a checkpoint), score (score --images with the stored calibration) or export '
  '(write WORKDIR/export/: a model file and detector.json).',
)
flags.DEFINE_enum('format', 'stablehlo', ['stablehlo', 'onnx'], 'export: the model file format.')
flags.DEFINE_string('checkpoint', 'latest', "eval/score: 'latest', 'best' or a step.")


@flags.validator('checkpoint')
def _check_checkpoint(value) -> bool:
  try:
    config_lib.checkpoint_selector(value)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from e
  return True


flags.DEFINE_string('images', None, 'score: an image file or a folder of images.')
flags.DEFINE_bool('maps', False, 'score: also write anomaly-map PNGs.')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'Multi-process runs: host:port of process 0 (omit on TPU pods and SLURM, where it is detected).',
)
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process.')
flags.DEFINE_bool(
  'distributed', False, 'Call jax.distributed.initialize() (auto-detected on TPU pods / SLURM).'
)
flags.mark_flags_as_required(['workdir'])


def _scores(report: dict, score_kind: str) -> str:
  """The printed summary of a report: the paper score's AUROC first, then the rest."""
  own = '' if score_kind in ('paper', 'latent_knn') else f'AUROC {report["auroc"]:.4f}, '
  return (
    f'AUROC {report["paper_score_auroc"]:.4f} (paper score; latent k-NN score '
    f'{report["latent_knn_auroc"]:.4f}; {score_kind} score: {own}average precision '
    f'{report["average_precision"]:.4f}, F1 {report["f1"]:.4f}{localisation.summary(report)})'
  )


def main(argv):
  del argv
  log_setup.quiet_library_logs()
  if FLAGS.mode != 'train' and (FLAGS.distributed or FLAGS.coordinator_address):
    raise app.UsageError(
      f'--mode={FLAGS.mode} runs in a single process: drop --distributed and '
      '--coordinator_address (on a TPU pod worker, also set JAX_PLATFORMS=cpu).'
    )
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info(
    'JAX process %d/%d, %d local / %d global devices (%s).',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  if FLAGS.mode == 'train':
    if FLAGS.config is None:
      raise app.UsageError('--config is required for training.')
    try:  # Every field, before anything runs: a bad one is named, not traced.
      config_lib.validate(FLAGS.config, jax.device_count())
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    report = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if report and jax.process_index() == 0:
      print(
        f'{_scores(report, FLAGS.config.score_kind)} after epoch {report["epoch"]}; outputs in '
        f'{FLAGS.workdir}/ (metrics.json, roc.png, score_histogram.png, reconstructions.png)'
      )
  elif FLAGS.mode == 'eval':
    report = trained_run.evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
    print(
      f'{_scores(report, report["score_kind"])} of the {FLAGS.checkpoint} checkpoint; outputs '
      f'rewritten in {FLAGS.workdir}/'
    )
  elif FLAGS.mode == 'export':
    print('Exported to', export.export_run(FLAGS.workdir, FLAGS.format, FLAGS.checkpoint))
  else:
    if not FLAGS.images:
      raise app.UsageError('--mode=score needs --images=PATH (a file or a folder).')
    print(
      'Scores written to',
      trained_run.score_path(FLAGS.workdir, FLAGS.images, FLAGS.maps, FLAGS.checkpoint),
    )


if __name__ == '__main__':
  app.run(main)
