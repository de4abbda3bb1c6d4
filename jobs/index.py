"""`ray job submit --working-dir . -- python jobs/index.py --config CONFIG`: the index stage on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["index", *sys.argv[1:]]))
