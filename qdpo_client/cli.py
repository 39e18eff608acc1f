"""Client commands of `qdpo`: models, files, jobs and webhooks over the REST API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qdpo_client.client import Client
from qdpo_client.config import resolve_connection
from qdpo_client.types import Event

out = Console()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="base models the service offers").add_subparsers(dest="models_command", required=True)
    models.add_parser("list").set_defaults(handler=lambda a: _table(_client(a).models.list(), ["id", "description"]))

    files = sub.add_parser("files", help="upload and manage dataset files").add_subparsers(dest="files_command", required=True)
    upload = files.add_parser("upload", help="upload a JSONL file")
    upload.add_argument("path", type=Path)
    upload.add_argument("--purpose", choices=["prompts", "preferences", "references"], required=True)
    upload.set_defaults(handler=lambda a: _show(_client(a).files.upload(a.path, a.purpose)))
    listing = files.add_parser("list")
    listing.add_argument("--purpose", choices=["prompts", "preferences", "references"])
    _paging(listing)
    listing.set_defaults(
        handler=lambda a: _table(_client(a).files.list(purpose=a.purpose, after=a.after, limit=a.limit).data, ["id", "purpose", "filename", "rows", "bytes"])
    )
    for name, method in (("get", "get"), ("delete", "delete")):
        command = files.add_parser(name)
        command.add_argument("file_id")
        command.set_defaults(handler=lambda a, m=method: _show(getattr(_client(a).files, m)(a.file_id)))
    content = files.add_parser("content", help="print a file's content")
    content.add_argument("file_id")
    content.set_defaults(handler=lambda a: sys.stdout.write(_client(a).files.content(a.file_id).decode()))

    jobs = sub.add_parser("jobs", help="create, follow and download alignment jobs").add_subparsers(dest="jobs_command", required=True)
    create = jobs.add_parser("create", help="create a job (every omitted setting takes the server's default)")
    create.add_argument("--model", default="smollm2-135m-instruct")
    create.add_argument("--method", default="qdpo", help="qdpo, dpo, kd, …")
    create.add_argument("--quantization", default="nf4", help="nf4, fp4, int8 or rtn")
    create.add_argument("--bits", type=int)
    create.add_argument("--group-size", type=int)
    create.add_argument("--file", dest="file_id", help="training file id (prompts, or preferences for dpo); default: built-in prompts")
    create.add_argument("--eval-file", dest="eval_file_id", help="held-out prompts file id")
    create.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter, e.g. --hp beta=0.1 --hp epochs=2")
    create.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any other setting, e.g. --set generation.max_new_tokens=48")
    create.add_argument("--seed", type=int)
    create.add_argument("--suffix")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--from-json", type=Path, help="a complete POST /v1/jobs body; other options are ignored")
    create.add_argument("--wait", action="store_true", help="follow the job until it ends")
    create.set_defaults(handler=cmd_jobs_create)
    listing = jobs.add_parser("list")
    listing.add_argument("--status")
    _paging(listing)
    listing.set_defaults(
        handler=lambda a: _table(
            _client(a).jobs.list(status=a.status, after=a.after, limit=a.limit).data, ["id", "status", "stage", "model", "fine_tuned_model"]
        )
    )
    for name in ("get", "cancel", "delete", "metrics", "checkpoints"):
        command = jobs.add_parser(name)
        command.add_argument("job_id")
        command.set_defaults(handler=lambda a, m=name: _show(getattr(_client(a).jobs, m)(a.job_id)))
    wait = jobs.add_parser("wait", help="follow a job with a progress bar until it ends")
    wait.add_argument("job_id")
    wait.set_defaults(handler=lambda a: _show(_client(a).jobs.wait(a.job_id, on_event=_print_event)))
    events = jobs.add_parser("events", help="a job's events (--follow streams them live)")
    events.add_argument("job_id")
    events.add_argument("--after")
    events.add_argument("--limit", type=int)
    events.add_argument("--follow", "-f", action="store_true")
    events.set_defaults(handler=cmd_jobs_events)
    report = jobs.add_parser("report", help="the before/after evaluation report")
    report.add_argument("job_id")
    report.add_argument("--markdown", action="store_true")
    report.set_defaults(handler=lambda a: _show(_client(a).jobs.report(a.job_id, markdown=a.markdown)))
    download = jobs.add_parser("download", help="download the adapter (sha256 verified)")
    download.add_argument("job_id")
    download.add_argument("--dir", type=Path, default=Path("."))
    download.add_argument("--no-extract", action="store_true")
    download.set_defaults(handler=lambda a: print(_client(a).jobs.download_adapter(a.job_id, a.dir, extract=not a.no_extract)))

    webhooks = sub.add_parser("webhooks", help="endpoints that receive signed job events").add_subparsers(dest="webhooks_command", required=True)
    register = webhooks.add_parser("create", help="register an endpoint; prints its signing secret once")
    register.add_argument("url")
    register.add_argument(
        "--event",
        dest="events",
        action="append",
        metavar="TYPE",
        help="job.succeeded, job.failed, job.cancelled, job.running, … (repeatable; default: the three terminal ones)",
    )
    register.add_argument("--description")
    register.set_defaults(handler=cmd_webhooks_create)
    webhooks.add_parser("list").set_defaults(handler=lambda a: _table(_client(a).webhooks.list().data, ["id", "url", "events", "description"]))
    for name in ("get", "delete"):
        command = webhooks.add_parser(name)
        command.add_argument("webhook_id")
        command.set_defaults(handler=lambda a, m=name: _show(getattr(_client(a).webhooks, m)(a.webhook_id)))
    deliveries = webhooks.add_parser("deliveries", help="what was sent to an endpoint, newest first")
    deliveries.add_argument("webhook_id")
    deliveries.add_argument("--status", choices=["pending", "succeeded", "failed"])
    _paging(deliveries)
    deliveries.set_defaults(handler=cmd_webhooks_deliveries)


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--after", help="cursor from the previous page")
    parser.add_argument("--limit", type=int)


def _client(args) -> Client:
    return Client(connection=resolve_connection(args.base_url, args.api_key, given_as=("--base-url", "--api-key")))


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str], what: str) -> dict:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what}: expected KEY=VALUE, got {item!r}")
        result[key] = value
    return result


def job_request(args) -> dict:
    """The POST /v1/jobs body the create options describe."""
    if args.from_json:
        return json.loads(args.from_json.read_text())
    quantization = {"method": args.quantization, **({"bits": args.bits} if args.bits else {}), **({"group_size": args.group_size} if args.group_size else {})}
    body: dict = {"model": args.model, "quantization": quantization, "method": {"type": args.method}}
    if hyper := {k: _value(v) for k, v in _pairs(args.hp, "--hp").items()}:
        body["method"]["hyperparameters"] = hyper
    dataset = {k: v for k, v in (("file_id", args.file_id), ("eval_file_id", args.eval_file_id)) if v}
    for dotted, value in _pairs(args.set, "--set").items():
        section, _, key = dotted.partition(".")
        if not key:
            raise SystemExit(f"--set: expected SECTION.KEY=VALUE, got {dotted!r}")
        (dataset if section == "dataset" else body.setdefault(section, {}))[key] = _value(value)
    if dataset:
        body["dataset"] = dataset
    for key in ("seed", "suffix"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.metadata:
        body["metadata"] = _pairs(args.metadata, "--metadata")
    return body


def cmd_jobs_create(args) -> None:
    client = _client(args)
    body = job_request(args)
    job = client.jobs.create(**body)
    out.print(f"created {job.id} ({job.status})")
    _show(client.jobs.wait(job.id, on_event=_print_event) if args.wait else job)


def cmd_jobs_events(args) -> None:
    client = _client(args)
    if args.follow:
        for event in client.jobs.stream_events(args.job_id, after=args.after):
            _print_event(event)
        return
    for event in client.jobs.events(args.job_id, after=args.after, limit=args.limit).data:
        _print_event(event)


def cmd_webhooks_create(args) -> None:
    endpoint = _client(args).webhooks.create(args.url, events=args.events, description=args.description)
    out.print(f"created {endpoint.id} for {', '.join(endpoint.events)} → {endpoint.url}", highlight=False, markup=False)
    out.print("signing secret (shown only now; verify deliveries with qdpo_client.verify_webhook):", highlight=False)
    print(endpoint.secret)


def cmd_webhooks_deliveries(args) -> None:
    page = _client(args).webhooks.deliveries(args.webhook_id, status=args.status, after=args.after, limit=args.limit)
    table = Table()
    for column in ("id", "event", "job", "status", "attempts", "last answer"):
        table.add_column(column, no_wrap=column == "id", overflow="fold")
    for delivery in page.data:
        answer = delivery.last_error or (str(delivery.last_status_code) if delivery.last_status_code is not None else "")
        table.add_row(delivery.id, delivery.event_type, delivery.job_id or "", delivery.status, str(delivery.attempts), answer)
    out.print(table)
    if page.has_more:
        out.print(f"more: --after {page.next_cursor}", highlight=False)


def _print_event(event: Event) -> None:
    if event.type == "metrics":
        return  # one per training step: the progress bar and `jobs metrics` show them
    style = {"warning": "yellow", "error": "red"}.get(event.level, "dim" if event.type == "status" else "")
    where = f"[{event.stage}] " if event.stage else ""
    out.print(f"{event.id:>9} {where}{event.message}", style=style, highlight=False, markup=False)


def _show(value) -> None:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in value]
    if isinstance(value, str):
        out.print(value, highlight=False, markup=False)
    else:
        out.print_json(json.dumps(value))


def _table(rows, columns: list[str]) -> None:
    table = Table()
    for column in columns:
        table.add_column(column, no_wrap=column == "id", overflow="fold")  # ids are copied: never cut them
    for row in rows:
        table.add_row(*[str(getattr(row, c, "") if getattr(row, c, None) is not None else "") for c in columns])
    out.print(table)
