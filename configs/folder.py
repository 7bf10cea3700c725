"""Your own images, in the reference's folder layout:

  ROOT/train/0.normal/*.png|jpg|bmp   normal training images
  ROOT/test/0.normal/*                normal test images
  ROOT/test/1.abnormal/*              abnormal test images

Command:
  python main.py --config=configs/folder.py --workdir=runs/mydata \
      --config.dataset.root=/path/to/ROOT [--config.nc=1] [--config.isize=64]
Any image size (shorter side resized to isize, then centre-cropped); grayscale, RGB and
RGBA are converted to nc channels. 5% of train/0.normal is held out for calibration.
Score new images afterwards:
  python main.py --config=configs/folder.py --workdir=runs/mydata --mode=score \
      --images=/path/to/new_images --maps
Result: depends on your data.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'folder'
  config.dataset.root = ''  # Required: --config.dataset.root=/path/to/ROOT.
  config.nc = 3
  return config
