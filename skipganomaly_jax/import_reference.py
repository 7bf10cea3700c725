"""`python -m skipganomaly_jax.import_reference`: a run from the authors' netG.pth/netD.pth.

The command's short name; the code lives in `skipganomaly_jax/deploy/import_reference.py`.
"""

from absl import app

from skipganomaly_jax.deploy.import_reference import define_flags, main

if __name__ == '__main__':
  define_flags()
  app.run(main)
