"""`ray job submit --working-dir . -- python jobs/neighbors.py --config CONFIG`: the neighbors stage on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["neighbors", *sys.argv[1:]]))
