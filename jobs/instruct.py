"""`ray job submit --working-dir . -- python jobs/instruct.py --config CONFIG`: instruction tuning on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["instruct", *sys.argv[1:]]))
