"""``python -m examples.service``: run the shop under uvicorn (one worker, one node).

Configuration comes from the environment (``HANDOFF_*``, ``SHOP_*``); the command line
only says where HTTP listens. One worker on purpose: each worker process would hold its own
caches and its own node, and a peer's handoff would reach only one of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from examples.service.logs import configure_logging
from examples.service.shop import create_app
from handoff import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT (then drain and exit)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.service",
        description="The warm-handoff example shop. Configure the node with HANDOFF_* and "
        "the shop with SHOP_* environment variables (see examples/service/README.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    parser.add_argument(
        "--timeout-graceful-shutdown",
        type=int,
        default=5,
        help="seconds open HTTP requests get at shutdown before the drain starts (default 5)",
    )
    args = parser.parse_args(argv)
    try:
        configure_logging()
        app = create_app()
    except (ConfigError, ValueError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        log_level="info",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
