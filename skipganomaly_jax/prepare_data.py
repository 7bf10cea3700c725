"""`python -m skipganomaly_jax.prepare_data NAME`: prepares a TFDS dataset once.

The command's short name; the code lives in `skipganomaly_jax/data/prepare_data.py`.
"""

import sys

from skipganomaly_jax.data.prepare_data import main

if __name__ == '__main__':
  sys.exit(main())
