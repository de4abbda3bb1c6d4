"""`ray job submit --working-dir . -- python jobs/eval.py --config CONFIG`: perplexity and QA evaluation on the cluster."""

import sys

from retro_ray.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
