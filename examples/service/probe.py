"""``python -m examples.service.probe /stats``: ask the shop in this container or Machine.

For a shell on the host of one instance (``fly ssh console --machine ID -C ...``,
``kubectl exec POD -- ...``), where the image has Python but no curl. Prints the JSON
answer, pretty; exits 1 on an HTTP error or when nothing listens.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
    """GET ``path`` from the local shop and print the answer."""
    parser = argparse.ArgumentParser(prog="python -m examples.service.probe")
    parser.add_argument("path", nargs="?", default="/stats", help="default /stats")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    args = parser.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        print(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads(body), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
