"""The ``lookalike serve`` and ``lookalike query`` commands: the query server and its client
on the command line (``serving.server``, ``serving.client``)."""

from __future__ import annotations

import argparse
import json

from lookalike.pipeline.cli_options import (
    DEFAULT_PORT,
    MAX_RESULTS,
    NON_EMPTY,
    PORT,
    POSITIVE,
    RESULT_COUNT,
    _add_workdir,
    _float_in,
    watch_interval,
)


def cmd_serve(args: argparse.Namespace) -> int:
    from lookalike.serving.server import serve

    serve(args.workdir, host=args.host, port=args.port, watch_interval_s=args.watch_interval_s or None,
          max_batch=args.max_batch, max_embed_batch=args.max_embed_batch, batch_wait_ms=args.batch_wait_ms,
          inline_max_ms=args.inline_max_ms, access_log=args.access_log, max_large_uploads=args.max_large_uploads)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from lookalike.serving.client import SearchClient, format_results, parse_vector

    vector = parse_vector(args.vector, "--vector") if args.vector is not None else None  # before any request
    client = SearchClient(args.url, retry_busy_s=args.wait_s)
    filters = {key: value for key, value in (("kind", args.kind), ("group", args.group or None), ("source", args.source or None),
                                              ("tag", args.tag or None), ("max_per_group", args.max_per_group))
               if value is not None}
    if args.image is not None:
        response = client.search_image(args.image, k=args.k, **filters)
    elif args.id is not None:
        response = client.similar(args.id, k=args.k, **filters)
    else:
        response = client.search_vector(vector, k=args.k, **filters)
    print(json.dumps(response, indent=2) if args.json else format_results(response))
    return 0


def add_serving_commands(sub) -> None:
    """Add ``serve`` and ``query`` to the ``lookalike`` subcommands ``sub``."""
    p = sub.add_parser("serve", help="serve the CURRENT index: JSON API and web page",
                       description="Loads the CURRENT index and its model and serves POST /v1/search/image, "
                       "POST /v1/search/vector, POST /v1/search/batch, GET /v1/items/{id}/similar, /v1/info, "
                       "/healthz, /readyz, /metrics and a web page at /; follows CURRENT and hot-swaps new "
                       "versions. Admin endpoints need LOOKALIKE_ADMIN_TOKEN in the environment. "
                       "Example: lookalike serve --workdir DIR --port 8765")
    _add_workdir(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; use 0.0.0.0 deliberately)")
    p.add_argument("--port", type=PORT, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--watch-interval-s", type=watch_interval, default=2.0,
                   help="how often to check CURRENT for a new index version, 0.1-3600 (0: never; POST /v1/admin/reload "
                        "still works)")
    p.add_argument("--max-batch", type=POSITIVE, default=64, help="most searches answered by one ScaNN call (1: no batching)")
    p.add_argument("--max-embed-batch", type=POSITIVE, default=16,
                   help="most uploaded images embedded in one model forward (1: no batching)")
    p.add_argument("--batch-wait-ms", type=_float_in(0.0, 1000.0), default=2.0,
                   help="longest wait for announced queries to join a batch (0-1000)")
    p.add_argument("--inline-max-ms", type=_float_in(0.0, 1000.0), default=2.0,
                   help="a lone unfiltered query (no other request arriving or in progress) whose work recently took at "
                        "most this long runs on the event loop instead of a batcher's thread, saving two thread "
                        "hand-offs (default 2; 0: never)")
    p.add_argument("--max-large-uploads", type=POSITIVE, default=None,
                   help="request bodies over 1 MiB (large image uploads) taken in at once; more wait their turn (their "
                        "bytes stay with the client) and get a 503 after 30 s (default: two per CPU)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no log line per request (by default one per request on stdout, time-stamped; errors and "
                        "swaps are logged either way, and /metrics counts every request)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("query", help="ask a running server for similar images",
                       description="Examples: lookalike query --image cat.jpg; lookalike query --id 3/digit_0042.png; "
                       "lookalike query --vector -0.1,0.2,... Prints a table: rank, id, score, distance, same item, "
                       "then a video time column when there are frames and a metadata column (source, #tags, "
                       "name=value) when any result has metadata; --json for the whole response.")
    p.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                   help="server address; without a scheme (127.0.0.1:8765) http:// is assumed")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=NON_EMPTY, help="search by this image file")
    what.add_argument("--id", type=NON_EMPTY, help="search by a stored item id (one starting with '-' too: --id -x.png)")
    what.add_argument("--vector", type=NON_EMPTY,
                      help="search by an embedding, comma-separated finite numbers (no NaN or infinity); a first "
                      "value below zero works as --vector -0.1,0.2 or --vector=-0.1,0.2")
    p.add_argument("-k", type=RESULT_COUNT, default=10, help=f"number of results (1-{MAX_RESULTS})")
    p.add_argument("--kind", choices=["image", "frame"], default=None, help="only images or only video frames")
    p.add_argument("--group", action="append", type=NON_EMPTY, default=[],
                   help="only this group / video id (repeatable)")
    p.add_argument("--source", action="append", type=NON_EMPTY, default=[],
                   help="only items of this source (metadata; repeatable)")
    p.add_argument("--tag", action="append", type=NON_EMPTY, default=[],
                   help="only items with this tag (metadata; repeatable: any of them)")
    p.add_argument("--max-per-group", type=RESULT_COUNT, default=None,
                   help=f"at most M results per video or group (1-{MAX_RESULTS})")
    p.add_argument("--json", action="store_true", help="print the raw JSON response")
    p.add_argument("--wait-s", type=_float_in(0, 3600), default=60.0,
                   help="while the server answers 503 with Retry-After (still loading its model and index, or busy "
                   "with large uploads), ask again for up to this many seconds (0: never)")
    p.set_defaults(func=cmd_query)
