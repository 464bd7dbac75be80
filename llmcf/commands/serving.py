"""`llmcf serve` and `demo`: the ranker's HTTP API, and every stage at once on the embedded defaults."""

from __future__ import annotations

import argparse

from llmcf.backend_names import BACKEND_NAMES
from llmcf.commands.arguments import non_negative_int, positive_float, positive_int
from llmcf.commands.interface import Subcommands
from llmcf.demo import DemoOptions
from llmcf.model_kinds import MODEL_KINDS
from llmcf.settings import Settings


def add_serve(sub: Subcommands) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the ranker over HTTP: POST /v1/rank, /healthz, /readyz, /metrics, /docs",
        description="Scores candidates with the newest 'serving' model version of the kind (the newest 'candidate' is "
        "promoted on a first deployment), swapping in newer versions as they are promoted (polled every "
        "LLMCF_RANKER_MODEL_POLL_S). ICT models retrieve their exact in-context examples from an example pool kept in "
        "memory, synced from the stored CoT samples every LLMCF_RANKER_POOL_SYNC_S. Stops cleanly on SIGTERM / Ctrl-C.",
    )
    p.add_argument("--host", help="listen address (default LLMCF_RANKER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=positive_int, help="port (default LLMCF_RANKER_PORT, 8000)")
    p.add_argument("--kind", choices=MODEL_KINDS,
                   help="model kind to serve (default LLMCF_RANKER_KIND, deepfm+ict)")
    p.add_argument("--version", help="serve exactly this model version (any status; no hot swap)")
    p.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads (default LLMCF_RANKER_THREADS, 1)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.threads import pin_native_threads

    pin_native_threads(args.threads or settings.ranker_threads)  # before numpy and onnxruntime load
    from ranker.serving.server import ServeOptions, run_server

    return run_server(settings, ServeOptions(host=args.host, port=args.port, kind=args.kind, version=args.version,
                                             threads=args.threads))


def add_demo(sub: Subcommands) -> None:
    p = sub.add_parser(
        "demo", help="the main job end to end on the embedded defaults",
        description="Brings up the broker and the database, starts worker, generator, updater and ranker, replays a "
        "MovieLens window with event times set to publish times, prints a live status line, then a summary, a "
        "freshness plot and the URLs to try. Ctrl-C stops everything; running it again resumes where it stopped. "
        "The processes keep running after the summary (`llmcf demo --stop`).",
    )
    demo = DemoOptions()
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], default=demo.dataset, help="default %(default)s")
    p.add_argument("--limit", type=positive_int, default=demo.limit, help="interactions to replay (default %(default)s)")
    p.add_argument("--rate", type=positive_float, default=demo.rate, help="events published per second (default %(default)s)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=demo.backend,
                   help="CoT backend of the generator (default %(default)s: SmolLM2 on the CPU, or the first GPU; "
                   "template is a deterministic rationale, NOT an LLM)")
    p.add_argument("--port", type=positive_int, default=demo.port, help="port of the ranker (default %(default)s)")
    p.add_argument("--metrics-port-base", type=positive_int, default=demo.metrics_port_base,
                   help="/metrics of the worker on this port, the generator on the next, the updater on the one after "
                   "(default %(default)s)")
    p.add_argument("--update-interval", type=positive_float, default=demo.update_interval_s,
                   help="seconds between the updater's rounds (default %(default)s)")
    p.add_argument("--min-cots", type=non_negative_int, default=demo.min_cots,
                   help="chains of thought to wait for before the summary (default %(default)s)")
    p.add_argument("--timeout", type=positive_float, default=demo.timeout_s,
                   help="seconds after which the summary is printed anyway (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="replay the window from its start, not from the last position")
    p.add_argument("--stop-at-end", action="store_true", help="stop the processes after the summary")
    p.add_argument("--stop", action="store_true", help="stop the processes a previous demo left running, and exit")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from llmcf.demo import run_demo, stop_demo

    if args.stop:
        return stop_demo(settings)
    return run_demo(settings, _demo_options(args))


def _demo_options(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(
        dataset=args.dataset, limit=args.limit, rate=args.rate, backend=args.backend, port=args.port,
        metrics_port_base=args.metrics_port_base, update_interval_s=args.update_interval, min_cots=args.min_cots,
        timeout_s=args.timeout, fresh=args.fresh, stop_at_end=args.stop_at_end,
    )
