"""`ray job submit --working-dir . -- python jobs/db.py --config CONFIG`: the db stage on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["db", *sys.argv[1:]]))
