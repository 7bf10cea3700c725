"""Downloads and prepares a TFDS dataset in ArrayRecord format (run once, with internet).

Usage:
  pip install -e .[prepare]   # TensorFlow: TFDS needs it to prepare image datasets.
  python -m skipganomaly_jax.prepare_data cifar10 [--data_dir DIR]

Training then reads the prepared files with `tfds.data_source` (no TensorFlow, offline);
pass the same directory as --config.dataset.data_dir if it is not TFDS's default.
"""

import argparse
import importlib.util
import sys

INSTALL_HINT = (
  'Preparing a TFDS image dataset needs TensorFlow, which is not installed. Install the '
  "'prepare' extra:\n    pip install -e .[prepare]\nthen rerun this command "
  '(training itself reads the prepared files without TensorFlow).'
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line.

  Args:
    argv: arguments without the program name (default: sys.argv[1:]).

  Returns:
    The namespace with `name` and `data_dir`.
  """
  parser = argparse.ArgumentParser(
    prog='python -m skipganomaly_jax.prepare_data', description=__doc__.splitlines()[0]
  )
  parser.add_argument('name', help="TFDS dataset name, e.g. 'cifar10', 'mnist'.")
  parser.add_argument(
    '--data_dir', default='', help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)."
  )
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """Prepares the dataset named on the command line.

  Args:
    argv: arguments without the program name (default: sys.argv[1:]).

  Returns:
    The process exit status: 0 on success, 1 when TensorFlow is missing.
  """
  args = parse_args(argv)
  if importlib.util.find_spec('tensorflow') is None:
    print(INSTALL_HINT, file=sys.stderr)
    return 1
  import tensorflow_datasets as tfds

  builder = tfds.builder(args.name, data_dir=args.data_dir or None)
  builder.download_and_prepare(file_format='array_record')
  print(
    f'Prepared {args.name} in {builder.data_dir}. Train with '
    f'--config.dataset.name={args.name}'
    + (f' --config.dataset.data_dir={args.data_dir}' if args.data_dir else '')
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
