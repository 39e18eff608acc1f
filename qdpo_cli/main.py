"""The `qdpo` command.

    qdpo run …                      run a pipeline locally, no service (qdpo_core's command line)
    qdpo serve                      embedded service: SQLite, filesystem broker, one worker, the API
    qdpo api | worker | migrate | reconcile | keys create --tenant NAME     production pieces
    qdpo files upload prompts.jsonl --purpose prompts
    qdpo jobs create --quantization rtn --bits 3 --hp beta=0.1 --wait
    qdpo jobs events JOB --follow ; qdpo jobs download JOB --dir out/

Client commands find the service and key as `qdpo_client.config` says: --base-url / --api-key, then
QDPO_BASE_URL / QDPO_API_KEY, then QDPO_HOST / QDPO_PORT, then the client config `qdpo serve` writes
($XDG_CONFIG_HOME/qdpo/config.json, by default ~/.config/qdpo/config.json).
"""

from __future__ import annotations

import argparse
import sys

from qdpo_cli import server as cli_server
from qdpo_client import cli as cli_client
from qdpo_client.errors import APIError, QdpoClientError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdpo", description="Alignment-as-a-service for quantized LLMs.")
    parser.add_argument(
        "--base-url", help="service URL (default: QDPO_BASE_URL, QDPO_HOST/QDPO_PORT, the client config `qdpo serve` writes, http://127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", help="API key (default: QDPO_API_KEY, or the client config's key for that URL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    run = sub.add_parser("run", help="run a pipeline locally without the service (see `qdpo run --help`)", add_help=False)
    run.add_argument("run_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run)
    cli_server.add_parsers(sub)
    cli_client.add_parsers(sub)
    return parser


GLOBAL_OPTIONS_WITH_VALUE = ("--base-url", "--api-key")


def _command_position(argv: list[str]) -> int | None:
    """Index of the sub-command in argv, past the global options (`qdpo --base-url X run …`)."""
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in GLOBAL_OPTIONS_WITH_VALUE:
            index += 2
        elif token.startswith("-"):
            index += 1
        else:
            return index
    return None


def cmd_run(args) -> int:
    from qdpo_core.cli import main as run_main  # torch and friends load only for local runs

    return run_main(args.run_args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    position = _command_position(argv)
    if position is not None and argv[position] == "run":  # what follows `run` is the local runner's own, --help included
        return cmd_run(argparse.Namespace(run_args=argv[position + 1 :]))
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except APIError as exc:
        where = f" (field: {exc.param})" if exc.param else ""
        print(f"error: {exc.code}: {exc.message}{where}", file=sys.stderr)
        for bad in exc.lines[:20]:
            print(f"  line {bad.get('line')}: {bad.get('field') or ''} {bad.get('message')}", file=sys.stderr)
        for line in (exc.hint or "").splitlines():
            print(f"  {line}", file=sys.stderr)
        return 1
    except (QdpoClientError, cli_server.CommandError) as exc:
        first, *rest = str(exc).splitlines() or [""]
        print(f"error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
