"""`mam2 serve` / `python -m pipeline.orchestrate.serve`: serve the flow `mam2` as deployment `full`.

Run it from the project root (where dvc.yaml is) against a Prefect server:

    prefect server start --host 127.0.0.1 --port 4200      # in one terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    mam2 serve                                              # in a second one
    prefect deployment run mam2/full --watch                # in a third

Each flow run executes in a process of its own, started in this directory. Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEPLOYMENT = "full"


def main(argv: list[str] | None = None) -> int:
    """Serve the deployment until interrupted; returns the exit code."""
    parser = argparse.ArgumentParser(prog="mam2 serve", description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: full)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="at most N flow runs at a time (default: no limit)")
    args = parser.parse_args(argv)
    if not Path("dvc.yaml").exists():
        print("mam2 serve: error: no dvc.yaml here; run it from the project root", file=sys.stderr)
        return 2
    from pipeline.orchestrate.flows import prefect_api_url, serve_deployment

    if prefect_api_url() is None:
        # Without an API URL Prefect would serve against a throw-away ephemeral server that no
        # `prefect deployment run` can reach.
        print("mam2 serve: error: PREFECT_API_URL is not set; start a server with `prefect server "
              "start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api",
              file=sys.stderr)
        return 2
    serve_deployment(args.name, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
