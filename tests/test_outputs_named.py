"""What a person reads: every output names its score, lists what was written, and no flag
of eval, score or export is ignored; score mode needs no training data.

Two tiny runs through main.main in this process (parsed as the command line parses
them, `main.parse_flags`), each trained from a working directory with a relative data
path whose data is deleted afterwards: the paper-score digits run (configs/demo.py read
from an .npz copy of the session's digits) and a map_topk texture run ('rec+d' map, whose
scale the checkpoint stores)."""

import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import app, flags
from absl import logging as absl_logging
from conftest import ROOT, TINY
from PIL import Image

from skipganomaly_jax import config as config_lib
from skipganomaly_jax import score_fn
from skipganomaly_jax.data import input_pipeline, textures
from skipganomaly_jax.deploy import trained_run
from skipganomaly_jax.reporting import outputs, plots
from skipganomaly_jax.scoring import localisation, metrics
from skipganomaly_jax.training import checkpointing, train

TINY_FLAGS = tuple(f'--config.{k}={v}' for k, v in TINY.items())
RUN_FLAGS = (
  *TINY_FLAGS,
  '--config.num_epochs=1',
  '--config.max_steps_per_epoch=2',
  '--config.eval_batch_size=512',
)


def run_main(*args) -> str:
  """main.py on the command line `args`, in this process, parsed as main.py parses it
  (`--config.FIELD` without `--config` included); returns what it printed. Usage errors
  raise `app.UsageError`, as main() raises them (app.run prints them and exits 1)."""
  import main  # noqa: PLC0415

  argv = [str(ROOT / 'main.py'), *map(str, args)]
  saved_argv, handler = sys.argv, absl_logging.get_absl_handler()
  saved_filters = list(handler.filters)
  sys.argv = argv
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      main.main(main.parse_flags(argv))
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)  # The override flags: defined again by the next parse.
    handler.filters[:] = saved_filters
  return out.getvalue()


@contextlib.contextmanager
def cwd(path):
  before = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(before)


def save_pngs(images: np.ndarray, folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True)
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0]).save(folder / f'{i:03d}.png')
  return folder


def read_csv(path) -> tuple[list, list]:
  lines = pathlib.Path(path).read_text().splitlines()
  return lines[0].split(','), [line.split(',') for line in lines[1:]]


# ----------------------------------------------------------------------------- paper score


@pytest.fixture(scope='module')
def digits(tmp_path_factory, digits_npz):
  """The demo run: trained from `home` with the relative data path data/digits.npz, then
  the data deleted. (workdir, printed line, epoch log lines, plot calls, val/test images.)"""
  home = tmp_path_factory.mktemp('digits_home')
  (home / 'data').mkdir()
  shutil.copy(digits_npz, home / 'data' / 'digits.npz')
  workdir = home / 'run'
  logged, plotted = [], []
  info = train.logging.info

  def record_info(msg, *args, **kwargs):
    logged.append(str(msg) % args if args else str(msg))
    info(msg, *args, **kwargs)

  def recording(fn):
    def wrapped(*args, **kwargs):
      plotted.append((fn.__name__, args, kwargs))
      return fn(*args, **kwargs)

    return wrapped

  with pytest.MonkeyPatch.context() as mp, cwd(home):
    mp.setattr(train.logging, 'info', record_info)
    for name in ('save_roc_curve', 'save_score_histogram'):
      mp.setattr(plots, name, recording(getattr(plots, name)))
    printed = run_main(
      f'--config={ROOT}/configs/demo.py',
      '--workdir=run',
      *RUN_FLAGS,
      '--config.dataset.name=arrays',
      '--config.dataset.path=data/digits.npz',
    )
    config = config_lib.from_stored(json.loads(_meta_path(workdir).read_text())['config'])
    splits = input_pipeline.load_splits(config_lib.specs(config).data)
  shutil.rmtree(home / 'data')  # From now on the run's data is gone.
  epochs = [line for line in logged if line.startswith('epoch ')]
  return dict(workdir=workdir, printed=printed, epochs=epochs, plotted=plotted, splits=splits)


def _meta_path(workdir) -> pathlib.Path:
  (step,) = [p for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  return step / 'meta' / 'metadata'


def test_summary_and_epoch_lines_lead_with_the_runs_score(digits):
  report = json.loads((digits['workdir'] / 'metrics.json').read_text())['final']
  printed = digits['printed'].strip()
  lead = f"paper score AUROC {report['auroc']:.4f} (the run's score; AUROC of the other scores: "
  assert printed.startswith(lead + f'latent k-NN {report["latent_knn_auroc"]:.4f}; '), printed
  assert 'paper score: average precision' in printed
  (epoch,) = digits['epochs']
  assert epoch.startswith('epoch 1: ' + lead), epoch
  assert 'mean of the validation normals' in epoch


def test_printed_outputs_are_what_is_in_the_workdir(digits):
  workdir = digits['workdir']
  listed = digits['printed'].strip().split('outputs in run/: ')[1].split(', ')  # As given.
  on_disk = sorted(p.name + ('/' if p.is_dir() else '') for p in workdir.iterdir())
  # Everything training wrote is listed (a new output missing from the listing fails).
  assert sorted(listed) == on_disk, (listed, on_disk)
  assert listed[:4] == ['metrics.json', 'roc.png', 'score_histogram.png', 'reconstructions.png']


def test_plots_name_the_score(digits):
  calls = {name: (args, kwargs) for name, args, kwargs in digits['plotted']}
  for name in ('save_roc_curve', 'save_score_histogram'):
    args, kwargs = calls[name]
    assert kwargs['score_name'] == 'paper score', name
    assert args[-1].startswith("paper score (the run's score), AUROC "), args[-1]


def test_tensorboard_tags_name_the_score(digits):
  report = json.loads((digits['workdir'] / 'metrics.json').read_text())['final']
  lines = (digits['workdir'] / 'metrics.jsonl').read_text().splitlines()
  (record,) = [r for r in map(json.loads, lines) if any(k.startswith('eval/') for k in r)]
  assert record['eval/auroc/paper'] == pytest.approx(report['paper_score_auroc'], abs=1e-6)
  assert record['eval/auroc/latent_knn'] == pytest.approx(report['latent_knn_auroc'], abs=1e-6)
  for key in ('f1', 'threshold', 'average_precision', 'val_score'):
    assert record[f'eval/{key}/paper'] == pytest.approx(report[key], rel=1e-6), key
  assert not {'eval/auroc', 'eval/f1', 'eval/paper_score_auroc'} & set(record)


def test_score_mode_needs_no_data_and_no_cwd(digits, tmp_path):
  """The validation normals scored in score mode, from another directory, data deleted:
  their normalised scores put the threshold percentile at exactly 1.0."""
  workdir, splits = digits['workdir'], digits['splits']
  images = save_pngs(splits.val, tmp_path / 'val')
  with cwd(tmp_path):
    printed = run_main(f'--workdir={workdir}', '--mode=score', f'--images={images}', '--maps')
  csv_path = workdir / 'scores.csv'
  assert f"Scored {len(splits.val)} image(s) with the run's paper score: {csv_path} " in printed
  assert f'anomaly maps in {workdir}/anomaly_maps/' in printed
  header, rows = read_csv(csv_path)
  assert header == ['path', 'score', 'normalised_score', 'anomalous', 'score_kind']
  assert {r[4] for r in rows} == {'paper'}
  scores = np.array([float(r[1]) for r in rows])
  normalised = np.array([float(r[2]) for r in rows])
  # Independently: the threshold is the 95th percentile of the validation normals' scores
  # (score_fn, the public API, with the run's lambda); normalised = score / threshold.
  params, config, _ = trained_run.load(str(workdir))
  val_scores = np.asarray(score_fn(params, splits.val, lam=config.score_lambda), np.float64)
  threshold = np.percentile(val_scores, config.threshold_percentile)
  np.testing.assert_allclose(normalised, scores / threshold, rtol=1e-4)
  assert np.percentile(normalised, config.threshold_percentile) == pytest.approx(1.0, abs=1e-5)
  assert [r[3] for r in rows] == ['yes' if n > 1 else 'no' for n in normalised]
  assert len(os.listdir(workdir / 'anomaly_maps')) >= len(splits.val)


@pytest.mark.parametrize(
  'mode, flag, named',
  [
    ('eval', '--config.score_lambda=0.5', '--config.score_lambda=0.5'),
    ('score', '--config.dataset.path=/elsewhere.npz', '--config.dataset.path=/elsewhere.npz'),
    ('export', '--config.model.nz=32', '--config.model.nz=32'),
    ('eval', f'--config={ROOT}/configs/demo.py', 'config.model.ngf=64 from --config='),
  ],
)
def test_a_refused_override_names_the_flag(digits, mode, flag, named, tmp_path):
  extra = ('--images=' + str(tmp_path),) if mode == 'score' else ()
  with pytest.raises(app.UsageError) as e:
    run_main(f'--workdir={digits["workdir"]}', f'--mode={mode}', flag, *extra)
  message = str(e.value)
  assert named in message and f"--mode={mode} uses the run's stored config" in message
  assert "the run's value: " in message and 'Drop the refused flag' in message


def test_flags_a_mode_does_not_read_are_refused(digits):
  with pytest.raises(app.UsageError, match='--maps is read by --mode=score only'):
    run_main(f'--workdir={digits["workdir"]}', '--mode=eval', '--maps')
  with pytest.raises(app.UsageError, match='--format is read by --mode=export only'):
    run_main(f'--workdir={digits["workdir"]}', '--mode=score', '--format=onnx', '--images=x')


def test_refusal_exits_non_zero_from_the_command_line(digits):
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / 'main.py'),
      f'--workdir={digits["workdir"]}',
      '--mode=eval',
      '--config.score_lambda=0.5',
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0 and '--config.score_lambda=0.5' in proc.stderr, proc.stderr[-2000:]


def test_export_prints_its_folder_and_files(digits):
  printed = run_main(f'--workdir={digits["workdir"]}', '--mode=export')
  folder = digits['workdir'] / 'export'
  assert printed.strip() == f'Exported to {folder}/: {", ".join(sorted(os.listdir(folder)))}'
  assert 'detector.json' in printed and 'scorer.stablehlo' in printed


# ----------------------------------------------------------------------------- map score


@pytest.fixture(scope='module')
def texture(tmp_path_factory):
  """A map_topk run ('rec+d') trained from `home` with the relative root 'data', a copy
  of the data kept at `moved` and the original deleted; expected scores of a few test
  images computed the old way, from the validation images."""
  home = tmp_path_factory.mktemp('texture_home')
  textures.generate_texture(
    str(home / 'data'), 'gravel', crop=64, num_train=40, num_test_good=4, num_per_kind=2
  )
  with cwd(home):
    printed = run_main(
      f'--config={ROOT}/configs/textures.py',
      '--workdir=run',
      *RUN_FLAGS,
      '--config.dataset.root=data',
      '--config.dataset.category=gravel',
      '--config.isize=32',
      '--config.batch_size=8',
      '--config.localisation.sigma=1.0',
    )
    params, config, _ = trained_run.load('run')
    splits = input_pipeline.load_splits(config_lib.specs(config).data)
  settings = config_lib.specs(config).localisation
  assert config.score_kind == 'map_topk' and settings.map == 'rec+d'
  terms = localisation.term_scale(localisation.map_terms(params, splits.val, settings.d_levels))
  pick = np.r_[0:3, len(splits.test) - 3 : len(splits.test)]
  expected = localisation.score_images(params, splits.test[pick], 'map_topk', settings, terms)
  images = save_pngs(splits.test[pick], home / 'images')
  shutil.copytree(home / 'data', home / 'moved')
  shutil.rmtree(home / 'data')
  return dict(
    home=home, workdir=home / 'run', printed=printed, images=images, expected=expected['score']
  )


def test_map_score_run_names_its_score_first(texture):
  report = json.loads((texture['workdir'] / 'metrics.json').read_text())['final']
  assert report['auroc'] == report['map_topk_auroc']
  assert texture['printed'].startswith(
    f"map_topk AUROC {report['auroc']:.4f} (the run's score; AUROC of the other scores: "
    f'paper score {report["paper_score_auroc"]:.4f}, latent k-NN '
  ), texture['printed']
  assert 'pixel AUROC' in texture['printed'] and 'localisation.png' in texture['printed']


def test_map_score_from_the_stored_scale_without_data(texture, tmp_path):
  with cwd(tmp_path):  # Another directory: the relative root would not resolve anyway.
    run_main(f'--workdir={texture["workdir"]}', '--mode=score', f'--images={texture["images"]}')
  _, rows = read_csv(texture['workdir'] / 'scores.csv')
  assert {r[4] for r in rows} == {'map_topk'}
  np.testing.assert_allclose([float(r[1]) for r in rows], texture['expected'], rtol=1e-5)


def test_old_checkpoint_without_scale_is_told_to_eval_then_scores(texture, tmp_path):
  workdir = tmp_path / 'old'
  shutil.copytree(texture['workdir'], workdir)
  meta_path = _meta_path(workdir)
  meta = json.loads(meta_path.read_text())
  stored = meta.pop('map_scale')
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(checkpointing.CheckpointError, match='has no stored map scale') as e:
    run_main(f'--workdir={workdir}', '--mode=score', f'--images={texture["images"]}')
  assert f'--workdir={workdir} --mode=eval' in str(e.value)
  # Eval with the data gone: named, with the flag that points at a moved copy.
  with pytest.raises(FileNotFoundError, match='--config.dataset.root=...'):
    run_main(f'--workdir={workdir}', '--mode=eval')
  # The honoured override: the moved copy; eval stores the scale with the checkpoint.
  run_main(f'--workdir={workdir}', '--mode=eval', f'--config.dataset.root={texture["home"]}/moved')
  restored = json.loads(meta_path.read_text())['map_scale']
  assert restored['terms'] == pytest.approx(stored['terms'], rel=1e-5)
  run_main(f'--workdir={workdir}', '--mode=score', f'--images={texture["images"]}')
  _, rows = read_csv(workdir / 'scores.csv')
  np.testing.assert_allclose([float(r[1]) for r in rows], texture['expected'], rtol=1e-5)


def test_normalised_score_is_score_over_threshold(rng):
  val = rng.gamma(2.0, 1e-3, size=100)  # Small scores, as the paper score's.
  calibration = metrics.Calibration.fit(val, 95)
  test = np.r_[rng.gamma(2.0, 1e-3, size=20), calibration.threshold]
  np.testing.assert_allclose(calibration.normalise(test), test / np.percentile(val, 95))
  assert calibration.normalise(test)[-1] == 1.0
  assert re.search(r'score / threshold', metrics.NORMALISED_SCORE)
  assert outputs.SCORES_CSV_COLUMNS[:4] == ('path', 'score', 'normalised_score', 'anomalous')
