"""`ray job submit --working-dir . -- python jobs/serve.py --config CONFIG [--serve-config cluster/serve.yaml]`:
the OpenAI-compatible app on the cluster, for as long as the job runs (`ray job stop` takes it down).
For an app that outlives any job, use `serve deploy cluster/serve.yaml`."""

import sys

from retro_ray.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
