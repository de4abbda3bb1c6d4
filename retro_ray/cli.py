"""``retro-ray STAGE --config FILE``: a thin layer over the stage functions.

Exit codes: 0 done; 2 the user's mistake (config, input file, stage order, a folder held by
another run), reported as one line naming the file, row or field; 1 anything else (a bug), with
its traceback under ``-v``; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# Other libraries' progress bars (a GGUF file's conversion, "Writing model shards") stay off the
# terminal, which shows the project's own progress lines: tqdm reads this once, when it is first
# imported, so it is set before the stages are imported. -v brings them back.
if not {"-v", "--verbose"} & set(sys.argv[1:]):
    os.environ.setdefault("TQDM_DISABLE", "1")

from retro_ray.core.config import QUICKSTART, load_config  # noqa: E402
from retro_ray.core.errors import find_user_error  # noqa: E402
from retro_ray.core.runtime import log, mute_ray_loggers, quiet_libraries, ray_session, setup_logging  # noqa: E402
from retro_ray.core.storage import Storage  # noqa: E402
from retro_ray.pipeline import STAGES  # noqa: E402
from retro_ray.preflight import check_config  # noqa: E402
from retro_ray.retrieval import index, neighbors  # noqa: E402
from retro_ray.training import pretrain


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="YAML config file (default: configs/quickstart.yaml, the whole "
                                                "product on the embedded corpus)")
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
    pipeline = sub.add_parser("pipeline", parents=[run_opts],
                              help="run every stage in order, then serve the model and ask it serve.question")
    pipeline.add_argument("--keep-serving", action="store_true",
                          help="keep the app up after the question, until Ctrl-C (default: take it down)")
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
    gen = sub.add_parser("generate", parents=[common],
                         help="continue prompts with the run's model, retrieving for every completed chunk")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--file", help="a text file, one prompt per line")
    gen.add_argument("--model",
                     help="an exported model folder (default: the run's tuned model, else its pretrained one)")
    gen.add_argument("--no-retrieval", action="store_true", help="decoder only: no index, no neighbours")
    gen.add_argument("--retrieval", choices=["encoder", "prompt", "both", "question", "off"],
                     help="encoder: neighbours retrieved for every completed chunk (default; both with --passages); "
                          "question: the encoder reads the top-k passages retrieved for --query for every chunk, "
                          "as InstructRetro answers questions; prompt/both: passages in the prompt too")
    gen.add_argument("--query", help="what passages are retrieved for (default: the prompt)")
    gen.add_argument("--passages", type=int, default=0, help="also put this many retrieved passages in the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="end the output before this string")
    export = sub.add_parser("export", parents=[common],
                            help="write the run's model with its tokenizer as a Hugging Face folder")
    export.add_argument("--out", required=True, help="output folder (local or s3://)")
    export.add_argument("--model", help="an exported model folder (default: the run's tuned model, else its pretrained one)")
    export.add_argument("--decoder-only", action="store_true",
                        help="without encoder and CCA, as a plain GPT-2 (or the retro-fitted base's) model that "
                             "AutoModelForCausalLM, vLLM or llama.cpp load with no project code")
    plan = sub.add_parser("plan", parents=[common],
                          help="size a database, its index and training on a cluster's node types, before starting")
    size = plan.add_mutually_exclusive_group()
    size.add_argument("--tokens", type=float, help="corpus size in tokens (e.g. 1.2e12)")
    size.add_argument("--sample-docs", type=int, default=1000,
                      help="else: tokenise this many documents of the config's corpus and scale by file sizes")
    plan.add_argument("--paper", action="store_true",
                      help="InstructRetro's inputs (1.2T tokens, BERT-large, OPQ64_128,IVF4194304_HNSW32,PQ64, "
                           "A100s) and each figure against the paper's")
    plan.add_argument("--embedder", help="bert-large, bert-base, all-MiniLM-L6-v2 or a Hugging Face folder "
                                         "(default: embed.model)")
    plan.add_argument("--factory", help="Faiss factory string (default: index.factory)")
    plan.add_argument("--cluster", help="cluster launcher YAML whose node types to plan on "
                                        "(default: this project's cluster/aws.yaml)")
    for stage in ("embed", "index", "train"):
        plan.add_argument(f"--{stage}-node", help=f"node type for {stage} (default: the one carrying "
                                                  f"resources.{stage}'s labels, else the likeliest)")
    plan.add_argument("--model-params", type=float, help="parameters of the model to train (default: the config's)")
    plan.add_argument("--train-tokens", type=float, help="tokens to train on (default: the corpus)")
    plan.add_argument("--days", type=float, default=7.0, help="wall-clock days for training")
    plan.add_argument("--nprobe", type=int, help="IVF lists a neighbour query scans (default: index.nprobe)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    srv = sub.add_parser("serve", parents=[common],
                         help="serve the run's model behind an OpenAI-compatible API (Ray Serve) until Ctrl-C")
    srv.add_argument("--serve-config", help="a Serve config file (cluster/serve.yaml): replicas, autoscaling, "
                                            "HTTP options and args.serve overrides")
    srv.add_argument("--model", help="an exported model folder (default: the run's tuned model, else its pretrained one)")
    srv.add_argument("--host", help="address to listen on (default: the Serve config's, else 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default: the Serve config's, else 8000)")
    srv.add_argument("--address", help="Ray cluster to join (default: a fresh local instance)")
    return parser


def _hold(url: str) -> None:
    """Keep the app up until Ctrl-C or SIGTERM (`ray job stop`)."""
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"retro-ray: serving the OpenAI API at {url}/v1 (Ctrl-C stops)", flush=True)
    while True:
        time.sleep(3600)


def _serve(cfg, args) -> None:
    """Deploy, then hold the app until Ctrl-C or SIGTERM, and take it down."""
    from ray import serve

    from retro_ray.serving.deployments import start

    mute_ray_loggers()  # Serve's, configured as it was imported
    if args.model:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": args.model})})
    try:
        _hold(start(cfg, args.serve_config, args.host, args.port))
    finally:
        serve.shutdown()


def _pipeline(cfg, storage: Storage, args) -> None:
    """Every stage; then the app serves the run's model and is asked ``serve.question`` over
    HTTP; the answer, its passages and the reports are printed."""
    from ray import serve

    from retro_ray.pipeline import answer_text, ask, demo, demo_text, reports, run_pipeline
    from retro_ray.serving.deployments import api_key, start

    mute_ray_loggers()  # Serve's, configured as it was imported
    run_pipeline(cfg, storage, args.force)
    if not cfg.serve.question:
        return
    try:
        log.info("pipeline: serving the run's model, to ask it: %s", cfg.serve.question)
        url = start(cfg)
        key = api_key(cfg.serve)
        response = ask(url, cfg.serve.question, key)
        print(f"\nretro-ray: asked {url}/v1/chat/completions: {cfg.serve.question}\n\n{answer_text(response)}\n",
              flush=True)
        if cfg.serve.demo:
            print(demo_text(demo(cfg, storage, url, key), cfg.serve.demo) + "\n", flush=True)
        print("reports:\n" + "\n".join(f"  {path}" for path in reports(cfg, storage)), flush=True)
        if args.keep_serving:
            _hold(url)
    finally:
        serve.shutdown()


def _plan(cfg, args) -> None:
    from retro_ray import plan

    paper = plan.PAPER_INPUTS if args.paper else {}
    embedder = args.embedder or paper.get("embedder") or cfg.embed.model or "all-MiniLM-L6-v2"
    tokens, per_token = args.tokens or paper.get("tokens"), None
    if tokens is None:
        tokens, per_token = plan.sample_corpus(cfg, args.sample_docs)
    m = cfg.model
    params = args.model_params or paper.get("model_params") or 12 * m.n_layers * m.d_model**2
    result = plan.make_plan(
        cfg, plan.node_types(args.cluster or plan.QUICKSTART_CLUSTER), tokens, embedder=embedder,
        factory=args.factory or paper.get("factory") or cfg.index.factory,
        nprobe=args.nprobe or cfg.index.nprobe, model_params=params,
        train_tokens=args.train_tokens or paper.get("train_tokens") or tokens, days=args.days,
        chunks_per_token=per_token, embed_node=args.embed_node or paper.get("embed_node"),
        index_node=args.index_node, train_node=args.train_node)
    versus = plan.vs_paper(result) if args.paper else None
    if args.json:
        print(json.dumps({**result.model_dump(), **({"vs_paper": versus} if versus else {})}))
    else:
        print(plan.render(result, versus))


def _export(cfg, storage: Storage, args) -> None:
    import tempfile

    from retro_ray.database import tokenizer
    from retro_ray.model.io import load_model, save_decoder_only, save_pretrained
    from retro_ray.core.layout import served_model

    path = served_model(cfg, storage, args.model)
    model = load_model(storage, path)
    with tempfile.TemporaryDirectory() as tmp:
        (save_decoder_only if args.decoder_only else save_pretrained)(model, tmp)
        tokenizer.load_run_tokenizer(cfg, storage).save_pretrained(tmp)
        storage.upload_dir(tmp, args.out)
    log.info("export: %s%s -> %s", path, " (decoder only)" if args.decoder_only else "", args.out)


def _generate(cfg, storage: Storage, args) -> None:
    from pathlib import Path

    from retro_ray.core.errors import UserError
    from retro_ray.serving.generate import SamplingParams, describe, run_generator

    if args.file and not Path(args.file).is_file():
        raise UserError(f"--file {args.file}: no such file")
    prompts = [args.prompt] if args.prompt else [
        line for line in Path(args.file).read_text().splitlines() if line.strip()]
    mode = "off" if args.no_retrieval else args.retrieval or ("both" if args.passages else "encoder")
    generator = run_generator(cfg, storage, args.model, retrieval=mode != "off")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=args.stop, seed=args.seed)
    queries = [args.query] * len(prompts) if args.query else None
    for out in generator.generate(prompts, params, mode=mode, passages=args.passages, queries=queries):
        print(describe(out) + "\n")


def _run(cfg, storage: Storage, args) -> None:
    """The commands that run on Ray."""
    action = getattr(args, "action", None)
    if args.command == "serve":
        _serve(cfg, args)
    elif args.command == "pipeline":
        _pipeline(cfg, storage, args)
    elif args.command == "compare":
        print(json.dumps(pretrain.compare(cfg, storage, args.force)))
    elif args.command == "index" and action == "verify":
        print(json.dumps(index.verify(cfg, storage, args.queries, args.k)))
    elif args.command == "neighbors" and action == "show":
        print(neighbors.show(cfg, storage, args.sample_id, args.split))
    else:
        STAGES[args.command](cfg, storage, args.force)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "neighbors" and args.action == "show" and args.sample_id is None:
        parser.error("neighbors show needs a SAMPLE_ID")
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        quiet_libraries()
    try:
        cfg = load_config(args.config or QUICKSTART, args.set)
        if args.command == "config":
            sys.stdout.write(cfg.to_yaml())
            return 0
        check_config(cfg)
        storage = Storage(cfg.storage)
        if args.command == "generate":  # no Ray: the model and the saved index run in this process
            _generate(cfg, storage, args)
            return 0
        if args.command == "export":
            _export(cfg, storage, args)
            return 0
        if args.command == "plan":  # no Ray: arithmetic, and a corpus sample read in this process
            _plan(cfg, args)
            return 0
        with ray_session(cfg, args.address, args.verbose) as ray_log:
            if ray_log:
                log.info("Ray's own messages -> %s (-v shows them here)", ray_log)
            _run(cfg, storage, args)
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
