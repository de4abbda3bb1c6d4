"""``retro-ray STAGE --config FILE``: a thin layer over the stage functions.

Exit codes: 0 done; 2 the user's mistake (config, input file, stage order, a folder held by
another run), reported as one line naming the file, row or field; 1 anything else (a bug), with
its traceback under ``-v``; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from retro_ray import index, neighbors, train
from retro_ray.config import load_config
from retro_ray.errors import find_user_error
from retro_ray.pipeline import STAGES, run_pipeline
from retro_ray.preflight import check_config
from retro_ray.runtime import init_ray, log, setup_logging
from retro_ray.storage import Storage


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set embed.batch_size=32")
    common.add_argument("--verbose", "-v", action="store_true", help="debug logging; tracebacks with errors")
    run_opts = argparse.ArgumentParser(add_help=False, parents=[common])
    run_opts.add_argument("--force", action="store_true",
                          help="rebuild even if the stage folder was built from another config")
    run_opts.add_argument("--address", help="Ray cluster to join (default: a fresh local instance)")

    parser = argparse.ArgumentParser(prog="retro-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", parents=[common], help="print the resolved config")
    config.add_argument("action", choices=["show"])
    sub.add_parser("pipeline", parents=[run_opts], help="run every stage in order")
    sub.add_parser("compare", parents=[run_opts],
                   help="train the GPT baseline and Retro on the same samples; write the perplexity table")
    stages = {name: sub.add_parser(name, parents=[run_opts], help=f"run the {name} stage") for name in STAGES}
    stages["index"].add_argument("action", nargs="?", choices=["verify"],
                                 help="verify: recall@k against exact search on random queries")
    stages["index"].add_argument("--queries", type=int, default=1000)
    stages["index"].add_argument("--k", type=int, default=10)
    stages["neighbors"].add_argument("action", nargs="?", choices=["show"],
                                     help="show SAMPLE_ID: a sample's chunks and their neighbours")
    stages["neighbors"].add_argument("sample_id", nargs="?", type=int)
    stages["neighbors"].add_argument("--split", choices=["train", "valid"], default="train")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "neighbors" and args.action == "show" and args.sample_id is None:
        parser.error("neighbors show needs a SAMPLE_ID")
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        cfg = load_config(args.config, args.set)
        if args.command == "config":
            sys.stdout.write(cfg.to_yaml())
            return 0
        check_config(cfg)
        storage = Storage(cfg.storage)
        init_ray(cfg, args.address)
        action = getattr(args, "action", None)
        if args.command == "pipeline":
            run_pipeline(cfg, storage, args.force)
        elif args.command == "compare":
            print(json.dumps(train.compare(cfg, storage, args.force)))
        elif args.command == "index" and action == "verify":
            print(json.dumps(index.verify(cfg, storage, args.queries, args.k)))
        elif args.command == "neighbors" and action == "show":
            print(neighbors.show(cfg, storage, args.sample_id, args.split))
        else:
            STAGES[args.command](cfg, storage, args.force)
    except KeyboardInterrupt:
        print("retro-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001: every failure ends in one line and an exit code
        log.debug("traceback", exc_info=True)
        found = find_user_error(e)
        if found:
            print(f"retro-ray: error: {found[1]}", file=sys.stderr)
            return 2
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"retro-ray: internal error: {type(e).__name__}: {first}"
              f"{'' if args.verbose else ' (rerun with -v for the traceback)'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
