"""`opd-fast serve-teacher`: its arguments, and running the server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from opd_fast.serving import server as server_module
from opd_fast.serving.scorer import Scorer, ServerLimits
from opd_fast.serving.server import LOOPBACK, TeacherServer


def add_serve_teacher_parser(commands) -> None:
    """Register `serve-teacher` on the opd-fast CLI's subparsers."""
    defaults = ServerLimits()
    parser = commands.add_parser(
        "serve-teacher",
        help="serve a teacher model's exact top-k payloads over HTTP (see docs/serving.md)",
        description=server_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="a Hugging Face model folder, a Hub id ORG/NAME, or 'toy'"
    )
    parser.add_argument("--revision", help="of a Hub id (a branch, tag or commit)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--token",
        default=os.environ.get("OPD_TEACHER_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default: $OPD_TEACHER_TOKEN)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu) | ...")
    parser.add_argument("--attn-implementation", default="auto")
    for name, help_text in (
        ("max_request_bytes", "largest request body (413 above)"),
        ("max_seq_len", "longest sequence (422 above)"),
        ("max_batch_sequences", "sequences per request and per forward"),
        ("max_batch_tokens", "padded tokens per request and per forward"),
        ("max_queue", "queued requests before 503"),
        ("max_connections", "connections with an authenticated request before 503"),
        ("max_pending_connections", "connections not yet authenticated before 503"),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name), help=help_text
        )
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms)
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=defaults.header_timeout_s,
        help="seconds a new connection has for its whole request head (408 after)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.set_defaults(handler=serve_teacher)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _enough_file_descriptors(needed: int) -> None:
    """Raise the soft limit on open files to `needed` (a socket per connection, the model's
    files); a common soft limit of 1024 would refuse connections before the server's limits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < needed:
        print(
            f"opd-fast serve-teacher: warning: {wanted} open files allowed (ulimit -n), fewer "
            f"than the {needed} the connection limits need; lower --max-pending-connections",
            file=sys.stderr,
        )


def serve_teacher(args) -> int:
    limits = ServerLimits(
        max_request_bytes=args.max_request_bytes,
        max_seq_len=args.max_seq_len,
        max_batch_sequences=args.max_batch_sequences,
        max_batch_tokens=args.max_batch_tokens,
        max_queue=args.max_queue,
        max_connections=args.max_connections,
        max_pending_connections=args.max_pending_connections,
        header_timeout_s=args.header_timeout_s,
        batch_wait_ms=args.batch_wait_ms,
    )
    if args.token == "":  # given, or $OPD_TEACHER_TOKEN set, but empty: not "no token"
        raise ValueError(
            "the token is empty (--token or $OPD_TEACHER_TOKEN); give a secret, or leave both "
            "unset to serve without authentication"
        )
    if args.host not in LOOPBACK and not args.token:
        print(
            f"opd-fast serve-teacher: warning: listening on {args.host} without a token; "
            "anyone who can reach it can use the model (set --token or $OPD_TEACHER_TOKEN)",
            file=sys.stderr,
        )
    _enough_file_descriptors(limits.max_connections + limits.max_pending_connections + 256)
    scorer = Scorer.from_path(
        args.model, args.device, args.dtype, args.attn_implementation, args.revision
    )
    server = TeacherServer(scorer, args.host, args.port, args.token, limits, args.verbose)
    signal.signal(signal.SIGTERM, _interrupt)
    info = scorer.info()
    print(
        f"opd-fast serve-teacher: {info['model']} (vocab {info['vocab_size']}, {info['dtype']} "
        f"on {info['device']}) listening on {server.url}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        server.batcher.close()
    return 0
