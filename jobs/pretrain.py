"""`ray job submit --working-dir . -- python jobs/pretrain.py --config CONFIG`: pretraining on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
