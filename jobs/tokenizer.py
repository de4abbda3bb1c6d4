"""`ray job submit --working-dir . -- python jobs/tokenizer.py --config CONFIG`: the tokenizer stage on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["tokenizer", *sys.argv[1:]]))
