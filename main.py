"""Trains, evaluates or scores with Skip-GANomaly.

    python main.py --config=configs/demo.py --workdir=runs/demo
    python main.py --config=configs/mnist.py --workdir=runs/mnist \
        --config.dataset.abnormal_class=3 --config.num_epochs=5
    python main.py --workdir=runs/demo --mode=eval [--config.dataset.root=/moved/data]
    python main.py --workdir=runs/demo --mode=score --images=path/to/folder --maps
    python main.py --workdir=runs/demo --mode=export [--format=onnx]

eval, score and export use the run's stored config: a --config file or --config.FIELD
override that differs from it is refused (exit 1, naming the flag), except where the data
lives for eval (dataset.root, dataset.path, dataset.data_dir).
"""

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.deploy import export, run_modes, trained_run
from skipganomaly_jax.reporting import log_setup, outputs
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
flags.DEFINE_string(
  'checkpoint',
  'latest',
  "eval/score/export: 'latest', 'best' (paper-score runs: the lowest mean paper score of "
  'the validation normals) or a step.',
)


@flags.validator('checkpoint')
def _check_checkpoint(value) -> bool:
  try:
    config_lib.checkpoint_selector(value)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from e
  return True


flags.DEFINE_string('images', None, 'score: an image file or a folder of images.')
flags.DEFINE_bool(
  'maps', False, 'score: also write a map and an overlay PNG per image (README: Reading the maps).'
)
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

# The modes that read each mode-specific flag; any other mode refuses it.
_MODE_FLAGS = {
  'checkpoint': ('eval', 'score', 'export'),
  'images': ('score',),
  'maps': ('score',),
  'format': ('export',),
}
# configs/default.py, spelled as no one types it: parse_flags gives it as --config when a
# command line has --config.FIELD overrides without a --config file (eval, score, export
# change the run's stored config, not a file's), so that main() can tell.
_OVERRIDES_ONLY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs/./default.py')


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flag parser: absl's, where --config.FIELD=VALUE may come without --config.

  The config flag reads its overrides from sys.argv, so the --config it gets is put there
  too.
  """
  argv = list(argv)
  given = any(re.match(r'--?config(=|$)', a) for a in argv[1:])
  if not given and any(re.match(r'--?(no)?config\.', a) for a in argv[1:]):
    argv.insert(1, f'--config={_OVERRIDES_ONLY}')
    sys.argv = argv
  return app.parse_flags_with_usage(argv)


def _file_given() -> bool:
  """Whether --config names a file (not just carries --config.FIELD overrides)."""
  return FLAGS.config is not None and FLAGS['config'].config_filename != _OVERRIDES_ONLY


def _requested_config() -> dict:
  """{field: (value, the flag that set it)}: what the command line sets in the config."""
  if FLAGS.config is None:
    return {}
  flag = FLAGS['config']
  values = config_lib.values(FLAGS.config)
  requested = {}
  if _file_given():
    for name, value in values.items():
      requested[name] = (value, f'config.{name}={value} from --config={flag.config_filename}')
  for name in config_flags.get_override_values(flag):
    requested[name] = (values[name], f'--config.{name}={values[name]}')
  return requested


def _check_flags() -> dict:
  """Refuses a flag the mode does not read; returns the honoured config changes.

  Raises:
    app.UsageError: naming the flag and what the mode uses instead.
  """
  for name, modes in _MODE_FLAGS.items():
    if FLAGS[name].present and FLAGS.mode not in modes:
      raise app.UsageError(
        f'--{name} is read by --mode={"/".join(modes)} only; --mode={FLAGS.mode} would '
        'ignore it: drop it.'
      )
  if FLAGS.mode == 'train':
    return {}
  try:
    requested = _requested_config()
    if not requested:
      return {}
    return run_modes.command_line_config(FLAGS.mode, FLAGS.workdir, FLAGS.checkpoint, requested)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  del argv
  log_setup.quiet_library_logs()
  data = _check_flags()  # Before anything runs.
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
  workdir = FLAGS.workdir
  if FLAGS.mode == 'train':
    if not _file_given():
      raise app.UsageError('--config=FILE is required for training (e.g. configs/demo.py).')
    try:  # Every field, before anything runs: a bad one is named, not traced.
      config_lib.validate(FLAGS.config, jax.device_count())
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    report = train.train_and_evaluate(FLAGS.config, workdir)
    if report and jax.process_index() == 0:
      written = outputs.evaluation_outputs(workdir)
      written += outputs.listing(workdir, outputs.TRAINING_OUTPUTS)
      print(
        f'{outputs.summary(report)} after epoch {report["epoch"]}; outputs in '
        f'{workdir}/: {", ".join(written)}'
      )
  elif FLAGS.mode == 'eval':
    report = run_modes.evaluate_checkpoint(workdir, FLAGS.checkpoint, data)
    kept = outputs.listing(workdir, outputs.TRAINING_OUTPUTS)
    print(
      f'{outputs.summary(report)} of the {FLAGS.checkpoint} checkpoint (step '
      f'{report["step"]}); written in {workdir}/: '
      f"{', '.join(outputs.evaluation_outputs(workdir))} (metrics.json's history gains this "
      f'evaluation)' + (f'; also there, from training: {", ".join(kept)}' if kept else '')
    )
  elif FLAGS.mode == 'export':
    directory = export.export_run(workdir, FLAGS.format, FLAGS.checkpoint)
    print(f'Exported to {directory}/: {", ".join(sorted(os.listdir(directory)))}')
  else:
    if not FLAGS.images:
      raise app.UsageError('--mode=score needs --images=PATH (a file or a folder).')
    csv_path = run_modes.score_path(workdir, FLAGS.images, FLAGS.maps, FLAGS.checkpoint)
    with open(csv_path) as f:
      count = len(f.read().splitlines()) - 1
    kind = trained_run.stored_config(workdir, FLAGS.checkpoint)[0].score_kind
    line = (
      f"Scored {count} image(s) with the run's {outputs.score_name(kind)}: {csv_path} "
      f'(columns {", ".join(outputs.SCORES_CSV_COLUMNS)}; normalised_score = score / '
      'threshold, anomalous = above it)'
    )
    if FLAGS.maps:
      line += f'; anomaly maps in {os.path.join(workdir, outputs.MAPS_FOLDER)}/'
    print(line)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
