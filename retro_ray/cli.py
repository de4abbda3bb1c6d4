"""``retro-ray STAGE --config FILE``: a thin layer over the stage functions."""

from __future__ import annotations

import argparse
import sys

from retro_ray.config import ConfigError, load_config
from retro_ray.corpus import BadInputError
from retro_ray.pipeline import STAGES, run_pipeline
from retro_ray.runtime import init_ray, log, setup_logging
from retro_ray.storage import StageMismatchError, Storage


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set embed.batch_size=32")
    run_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    run_opts.add_argument("--force", action="store_true",
                          help="rebuild even if the stage folder was built from another config")
    run_opts.add_argument("--address", help="Ray cluster to join (default: a fresh local instance)")

    parser = argparse.ArgumentParser(prog="retro-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", parents=[common], help="print the resolved config")
    config.add_argument("action", choices=["show"])
    sub.add_parser("pipeline", parents=[run_opts], help="run every stage in order")
    for name in STAGES:
        sub.add_parser(name, parents=[run_opts], help=f"run the {name} stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.set)
        if args.command == "config":
            sys.stdout.write(cfg.to_yaml())
            return 0
        storage = Storage(cfg.storage)
        init_ray(cfg, args.address)
        if args.command == "pipeline":
            run_pipeline(cfg, storage, args.force)
        else:
            STAGES[args.command](cfg, storage, args.force)
    except (ConfigError, BadInputError, StageMismatchError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
