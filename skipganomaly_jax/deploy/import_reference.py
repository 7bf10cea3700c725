"""Imports a model trained with the authors' PyTorch code as one of our checkpoints.

    python -m skipganomaly_jax.import_reference --netg=netG.pth --netd=netD.pth \\
        --config=configs/cifar10.py --workdir=runs/imported

The reference saves `{'epoch': e, 'state_dict': ...}` per network (lib/models/
basemodel.py `save_weights`: netG.pth / netD.pth, or netG_best.pth). The config must
describe the reference run: isize, nc, model.ngf, model.ndf, model.nz (the names and
shapes of the state dicts are checked against it, see `torch_weights`), and its dataset.
The GANomaly authors' code saves its netG.pth / netD.pth the same way: import them with
--config.model.name=ganomaly (and model.extra_layers as their --extralayers; model.ndf
= model.ngf, their D's width), ported by `ganomaly_weights`.
The workdir then holds an Orbax checkpoint (step 0) like one of ours, which
`skipganomaly_jax.load(workdir)`, `main.py --mode=eval` and `--mode=score` use.

Calibration and the latent k-NN bank need the config's dataset: when it loads, the
imported model is evaluated exactly as after a training epoch (k-NN bank of training
codes, threshold from the validation normals, test AUROC) and stored with it. When it is
not available (or with --nocalibrate), the checkpoint gets no calibration and the
paper score (config.score_kind = 'paper'; the k-NN bank needs training images):
`score_fn` and `--mode=eval` work, `--mode=score` needs a calibration.

Training in that workdir fine-tunes the imported weights for config.num_epochs with a
fresh Adam state (the reference does not save its optimisers). Reading `.pth` files needs
torch: `pip install -e '.[torch]'`.
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.nets import ganomaly_weights, torch_weights
from skipganomaly_jax.parallel import replicate
from skipganomaly_jax.training import checkpointing, train, training_step

IMPORT_RECORD = 'imported_from.json'  # Where the weights came from, and their evaluation.
TORCH_HINT = "reading .pth files needs torch: pip install -e '.[torch]' (or pip install torch)"


def read_pth(path: str) -> tuple[dict, int | None]:
  """A reference `.pth` file -> ({torch name: float32 numpy array}, its epoch or None).

  Accepts the reference's {'epoch', 'state_dict'} dict or a bare state dict.

  Raises:
    ImportError: torch is not installed (the message says how to install it).
    FileNotFoundError: no such file.
    ValueError: the file holds no state dict of tensors.
  """
  try:
    import torch  # noqa: PLC0415  (optional dependency, only for .pth files)
  except ImportError as e:
    raise ImportError(TORCH_HINT) from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such .pth file: {path}')
  blob = torch.load(path, map_location='cpu', weights_only=True)
  epoch = None
  if isinstance(blob, dict) and 'state_dict' in blob:
    epoch, blob = blob.get('epoch'), blob['state_dict']
  if not isinstance(blob, dict) or not all(torch.is_tensor(v) for v in blob.values()):
    raise ValueError(
      f"{path} holds no state dict of tensors (expected the reference's "
      "{'epoch': ..., 'state_dict': {name: tensor}} or a bare state dict)."
    )
  arrays = {k: v.detach().cpu().float().numpy() for k, v in blob.items()}
  return arrays, None if epoch is None else int(epoch)


def convert_state_dicts(netg: dict, netd: dict, spec) -> dict:
  """The authors' state dicts -> our scoring variables, for the model `spec` names.

  'skipganomaly': the Skip-GANomaly authors' `UnetGenerator` / `BasicDiscriminator`
  (`torch_weights`); 'ganomaly': the GANomaly authors' `NetG` / `NetD`
  (`ganomaly_weights`).

  Raises:
    ValueError: a key or shape that does not fit `spec` (named in the message).
  """
  if spec.name == 'ganomaly':
    return ganomaly_weights.convert_state_dicts(netg, netd, spec.generator(), spec.discriminator())
  return torch_weights.convert_state_dicts(netg, netd, spec)


def imported_states(specs: config_lib.RunSpecs, netg: dict, netd: dict):
  """Our (g_state, d_state) holding the reference's weights, with a fresh Adam state.

  Args:
    specs: the checked specs of the reference run's config (architecture, optimiser).
    netg: G's state dict, {torch name: numpy array}.
    netd: D's state dict, likewise.
  """
  step_spec = training_step.StepSpec.from_specs(specs)
  variables = convert_state_dicts(netg, netd, step_spec.model)
  g, d = training_step.create_train_states(step_spec, jax.random.key(specs.train.seed))

  def fill(state, net):
    params = jax.tree.map(jnp.asarray, net['params'])
    return state.replace(
      params=params,
      batch_stats=jax.tree.map(jnp.asarray, net['batch_stats']),
      opt_state=state.tx.init(params),
    )

  return fill(g, variables['generator']), fill(d, variables['discriminator'])


def _save_uncalibrated(config, workdir: str, g, d) -> None:
  """The checkpoint layout of `train.save`, without calibration, k-NN bank or history."""
  meta = {
    'config': json.loads(config.to_json()),
    'calibration': None,
    'data_iterator': {'epoch': 0, 'step_in_epoch': 0},
    'history': [],
    'knn_bank_shape': None,
    'imported': True,  # Counts as evaluated for loading (api.is_evaluated).
  }
  with checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    ckpt.save(0, {'g': g, 'd': d}, meta)
    ckpt.wait()


def import_state_dicts(
  config, workdir: str, netg: dict, netd: dict, calibrate: bool = True, source=None
) -> dict:
  """Writes `workdir/checkpoints/0` (and `workdir/imported_from.json`) from state dicts.

  Args:
    config: the ConfigDict of the reference run (architecture and dataset).
    workdir: the new workdir (must hold no checkpoints yet).
    netg: G's state dict, {torch name: numpy array}.
    netd: D's state dict, likewise.
    calibrate: load the dataset to build the k-NN bank and calibration (when available).
    source: JSON-serialisable provenance for imported_from.json (e.g. the .pth paths).

  Returns:
    The evaluation report (as after a training epoch), or {} when not calibrated.

  Raises:
    ValueError: state dicts that do not fit the config (key and shapes named); a
      workdir that already holds checkpoints.
  """
  config = config.copy_and_resolve_references()
  directory = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(f'{directory} already holds checkpoints: import into a new --workdir.')
  g, d = imported_states(config_lib.specs(config), netg, netd)
  source = source or {}
  ctx = None
  if calibrate:
    try:
      ctx = train.setup(config, workdir)
    except FileNotFoundError as e:
      logging.warning('Dataset not available (%s): importing without calibration.', e)
  if ctx is None:
    if config.score_kind != 'paper':
      logging.warning("No training images for the k-NN bank: score_kind set to 'paper'.")
      config.score_kind = 'paper'
    _save_uncalibrated(config, workdir, g, d)
    report = {}
  else:
    try:
      g, d = replicate((g, d), ctx.mesh)
      report, calibration, _, knn_bank = train.evaluate_epoch(ctx, g, d, epoch=0, step=0)
      # An empty history: training in this workdir then numbers its epochs from 1.
      train.save(ctx, g, d, 0, [], (knn_bank, calibration, report['val_score']))
      ctx.checkpointer.wait()
    finally:
      ctx.checkpointer.close()
      ctx.writer.close()
  with open(os.path.join(workdir, IMPORT_RECORD), 'w') as f:
    json.dump({'source': source, 'report': report}, f, indent=1)
  return report


FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config of the reference run.', lock_config=True)
  flags.DEFINE_string('netg', None, "The reference's generator weights (netG.pth).")
  flags.DEFINE_string('netd', None, "The reference's discriminator weights (netD.pth).")
  flags.DEFINE_string('workdir', None, 'New workdir for the imported checkpoint.')
  flags.DEFINE_bool('calibrate', True, 'Load the dataset for the k-NN bank and calibration.')
  flags.mark_flags_as_required(['config', 'netg', 'netd', 'workdir'])


def main(argv) -> None:
  del argv
  try:
    netg, g_epoch = read_pth(FLAGS.netg)
    netd, _ = read_pth(FLAGS.netd)
  except ImportError as e:
    raise app.UsageError(str(e)) from e
  source = {'netg': os.path.abspath(FLAGS.netg), 'netd': os.path.abspath(FLAGS.netd)}
  source['reference_epoch'] = g_epoch
  report = import_state_dicts(FLAGS.config, FLAGS.workdir, netg, netd, FLAGS.calibrate, source)
  if report:
    print(
      f'Imported into {FLAGS.workdir}: test AUROC {report["auroc"]:.4f} '
      f'({FLAGS.config.score_kind} score; paper score {report["paper_score_auroc"]:.4f}), '
      'calibrated on the validation normals.'
    )
  else:
    print(
      f'Imported into {FLAGS.workdir} WITHOUT calibration (dataset not loaded): '
      'skipganomaly_jax.load and --mode=eval work; --mode=score needs a calibration '
      '(rerun the import where the dataset is available).'
    )


if __name__ == '__main__':
  define_flags()
  app.run(main)
