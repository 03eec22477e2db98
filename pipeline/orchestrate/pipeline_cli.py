"""`mam2 pipeline`: run the Prefect flow `mam2` and, when it fails, say which stage failed and why.

    mam2 pipeline -p last_stage=decode              # in this process, through DVC
    mam2 pipeline --deployment -p dvc_mode=repro    # a run of the served deployment mam2/full

In this process the flow talks to PREFECT_API_URL, or to a temporary Prefect server when it is unset.
`--deployment` triggers a run of the deployment served by `mam2 serve` (PREFECT_API_URL needed) and
waits for it. `-p KEY=VALUE` sets a flow parameter, the value read as JSON when it is JSON (as
`prefect deployment run -p` reads it). A failed run ends with each failed stage's own error, e.g.

    mam2 pipeline: error: stage decode failed (exit code 1):
    mam2 decode: error: 4 of 4 videos could not be decoded: ...

and exit code 1; invalid parameters exit 2 before anything runs, naming the parameter.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.core.params import ParamsError
from pipeline.core.stage_cli import ERROR_EXIT_CODE, USAGE_EXIT_CODE

PROG = "mam2 pipeline"
# The prefixes Prefect puts before the exception's own text in a failed state's message.
STATE_PREFIXES = ("Flow run encountered an exception: ", "PipelineFailed: ")


def parse_params(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs as flow parameters, each value JSON when it parses (`shards=2`,
    `dask_address=null`), else the string itself (`last_stage=decode`)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"-p {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def failure_text(message: str) -> str:
    """A failed state's message without Prefect's prefixes: the stages' own errors."""
    for prefix in STATE_PREFIXES:
        message = message.removeprefix(prefix)
    return message.strip()


def _error(text: str, code: int) -> int:
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def _invalid(err: ParamsError) -> int:
    """Invalid parameters, worded as `mam2 <stage>` words invalid params."""
    print(f"{PROG}: {err}", file=sys.stderr)
    return USAGE_EXIT_CODE


def run_here(params: dict[str, Any]) -> int:
    """Run the flow in this process; print what ran, or why it failed."""
    from pipeline.orchestrate.flows import MissingDependency, PipelineFailed, mam2_flow

    try:
        results = mam2_flow(**params)
    except PipelineFailed as err:
        return _error(failure_text(str(err)), ERROR_EXIT_CODE)
    except ParamsError as err:
        return _invalid(err)
    except (MissingDependency, FileNotFoundError) as err:
        return _error(str(err), ERROR_EXIT_CODE)
    ran = [f"{r['stage']} ({r['seconds']:.1f} s)" for r in results.values() if r["ran"]]
    fresh = [r["stage"] for r in results.values() if not r["ran"]]
    print(f"{PROG}: done; ran: {', '.join(ran) or 'none'}; up to date: {', '.join(fresh) or 'none'}")
    return 0


def run_served(deployment: str, params: dict[str, Any]) -> int:
    """Run the served deployment, wait for the flow run to end, and print its outcome."""
    from prefect.deployments import run_deployment

    from pipeline.orchestrate.flows import prefect_api_url

    if prefect_api_url() is None:
        return _error("PREFECT_API_URL is not set: export the URL of the server that `mam2 serve` "
                      "serves to, e.g. http://127.0.0.1:4200/api", USAGE_EXIT_CODE)
    print(f"{PROG}: running {deployment} with {json.dumps(params) if params else 'its defaults'}; "
          f"waiting for it to end", file=sys.stderr)
    flow_run = run_deployment(deployment, parameters=params, timeout=None)
    state = flow_run.state
    if state is not None and state.is_completed():
        print(f"{PROG}: flow run {flow_run.name} ({flow_run.id}) completed")
        return 0
    reason = failure_text(state.message or "") if state is not None else ""
    what = state.name if state is not None else "an unknown state"
    return _error(f"flow run {flow_run.name} ({flow_run.id}) ended {what}"
                  + (f": {reason}" if reason else ""), ERROR_EXIT_CODE)


def main(argv: list[str] | None = None) -> int:
    """`mam2 pipeline [--deployment [NAME]] [-p KEY=VALUE ...]`; returns the exit code."""
    from pipeline.orchestrate.flows import FlowParams, _flow_params

    params_help = "\n".join(f"  {name}: {field.description}"
                            for name, field in FlowParams.model_fields.items())
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.strip(),
                                     epilog=f"flow parameters:\n{params_help}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--param", dest="params", action="append", default=[],
                        metavar="KEY=VALUE", help="a flow parameter (repeatable)")
    parser.add_argument("--deployment", nargs="?", const="mam2/full", metavar="NAME",
                        help="run the served deployment (default mam2/full) instead of in this process")
    args = parser.parse_args(argv)
    try:
        params = parse_params(args.params)
        _flow_params(**params)  # the flow's own check, before a server or DVC is touched
    except ParamsError as err:
        return _invalid(err)
    if args.deployment:
        return run_served(args.deployment, params)
    return run_here(params)


if __name__ == "__main__":
    sys.exit(main())
