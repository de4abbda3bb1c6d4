"""`ray job submit --working-dir . -- python jobs/pipeline.py --config CONFIG`: every stage on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["pipeline", *sys.argv[1:]]))
