"""Input pipeline internals; import the public API from `skipganomaly_jax.data.input_pipeline`.

- `images`: decoding, channel conversion, resize + centre crop, image folders.
- `sources`: the labelled image pools (offline MNIST digits, folder datasets, TFDS).
- `splits`: the evaluation protocols and the validation slice (`load_splits`).
- `batches`: deterministic multi-process training and evaluation batches.
"""
