"""API load benchmark: `qdpo api` on Postgres and Redis under many concurrent clients, loopback only.

    python bench/api_load.py                          # workers = CPU cores, 10 s per scenario, wrk if installed
    python bench/api_load.py --workers 2 --duration 20 --client python
    python bench/api_load.py --update-readme          # also replace the table between the README's bench:api_load markers

It creates a scratch database (dropped at the end) on --database-url's server, migrates it, makes an
API key and a few jobs, starts `qdpo api --workers N` as a subprocess on a free loopback port (a
private Redis queue that no worker reads, so jobs stay queued) and drives it with a load generator
for a bounded time per scenario:

    get-job        GET /v1/jobs/{id}          (64 and 256 clients; and 64 clients offering 1000 req/s)
    list-jobs      GET /v1/jobs?limit=20      (64 clients)
    create-job     POST /v1/jobs              (16 clients, and offering 300 req/s; each stores and queues a job)

A row without a rate is closed loop: every client sends its next request as soon as it has the
answer, which measures how much the server can answer — and with 64 clients the mean latency is
64 / throughput, so a p99 of 50 ms needs well over 1000 req/s. A row with `@rate` is open loop
(the Python client): the clients together send that many requests per second on a fixed schedule
and latency counts from when each request was due, so a server that falls behind shows it.

An error is anything but the expected status (200, 201 for POST): a 5xx, a socket error or a timeout.
The load generator runs on the same cores as the server and takes CPU from it, so the table says
how much CPU it and the server used per 1000 requests; `wrk` (C, `apt-get install wrk`) takes far
less than the Python client (asyncio, raw HTTP/1.1 keep-alive, no dependencies), which is the
fallback. The machine's load average before and after is recorded too: numbers taken while other
work loads the machine are lower bounds. Prints a table and writes bench/results/api_load.json
(+ .md) with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

# scenario name: (method, path template, body, expected status, default clients)
SCENARIOS = {
    "get-job": ("GET", "/v1/jobs/{job_id}", None, 200),
    "list-jobs": ("GET", "/v1/jobs?limit=20", None, 200),
    "create-job": ("POST", "/v1/jobs", b"{}", 201),
}
# scenario:clients for as fast as the server answers (closed loop), scenario:clients@rate for a fixed
# offered rate (open loop, Python client: latency counted from when each request was due)
DEFAULT_PLAN = "get-job:64,get-job:64@1000,list-jobs:64,get-job:256,create-job:16,create-job:16@300"


@dataclass
class Result:
    scenario: str
    clients: int
    tool: str
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    client_cpu_ms_per_1000: float | None
    server_cpu_ms_per_1000: float | None = None
    offered_rps: float | None = None  # fixed-rate rows: the rate asked for
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": [], "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        if match := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            info["model"] = match.group(1).strip()
        if match := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            info["flags"] = match.group(1).split()
    except OSError:
        pass
    return info


# --- the deployment under test ---------------------------------------------------------------


class Deployment:
    """A scratch database, a private queue and `qdpo api --workers N` serving them."""

    def __init__(self, admin_url: str, redis_url: str, workers: int, log_path: Path, extra_env: dict[str, str]):
        import sqlalchemy as sa

        self.admin_url, self.redis_url, self.workers, self.log_path = admin_url, redis_url, workers, log_path
        self.db_name = f"qdpo_bench_{secrets.token_hex(4)}"
        self.queue = f"qdpo_bench_{secrets.token_hex(4)}"
        self.db_url = sa.engine.make_url(admin_url).set(database=self.db_name).render_as_string(hide_password=False)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.var_dir = Path(tempfile.mkdtemp(prefix="qdpo-bench-"))
        self.extra_env = extra_env
        self.process: subprocess.Popen | None = None
        self.key = ""

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QDPO_")}
        env.update(
            QDPO_DATABASE_URL=self.db_url,
            QDPO_BROKER_URL=self.redis_url,
            QDPO_QUEUE_NAME=self.queue,
            QDPO_VAR_DIR=str(self.var_dir),
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            **self.extra_env,
        )
        return env

    def __enter__(self) -> Deployment:
        import sqlalchemy as sa

        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        from service.crud.keys import create_key
        from service.db import make_engine
        from service.migrate import upgrade

        upgrade(self.db_url)
        engine = make_engine(self.db_url, pooled=False)
        with sa.orm.Session(engine) as session:
            self.key = create_key(session, tenant_name="bench")[1]
        engine.dispose()
        log = open(self.log_path, "wb")
        command = [sys.executable, "-m", "qdpo_cli.main", "api", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        self.process = subprocess.Popen(command, env=self.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"qdpo api exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    # every worker process answers: a few requests over fresh connections
                    for _ in range(4 * self.workers):
                        httpx.get(self.base_url + "/healthz", timeout=2)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"qdpo api did not become ready in {timeout} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU of every process of the server (its process group), from /proc."""
        total, tick = 0.0, os.sysconf("SC_CLK_TCK")
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:  # field 5 of /proc/<pid>/stat: process group
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def create_jobs(self, count: int) -> list[str]:
        import httpx

        with httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as client:
            ids = []
            for _ in range(count):
                response = client.post("/v1/jobs", json={})
                response.raise_for_status()
                ids.append(response.json()["id"])
        return ids

    def __exit__(self, *_exc) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        import redis
        import sqlalchemy as sa

        try:
            client = redis.Redis.from_url(self.redis_url)
            # kombu 5.7: the exchange's binding table, its "permanent" marker set, and its entry in the deadline set
            client.delete(self.queue, f"_kombu.binding.{self.queue}", f"_kombu.binding_permanent.{self.queue}")
            client.zrem("_kombu.binding_deadlines", self.queue)
            client.close()
        except Exception as exc:  # the numbers are taken; a leftover queue is not worth failing over
            print(f"could not delete the bench queue {self.queue}: {exc}", file=sys.stderr)
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(self.var_dir, ignore_errors=True)


# --- load generators -----------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


WRK_SCRIPT = """
local method, body, expected = os.getenv("BENCH_METHOD"), os.getenv("BENCH_BODY"), tonumber(os.getenv("BENCH_EXPECTED"))
wrk.method = method
if body ~= nil and body ~= "" then wrk.body = body; wrk.headers["Content-Type"] = "application/json" end
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) unexpected = 0 end
function response(status, headers, body) if status ~= expected then unexpected = unexpected + 1 end end
function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("unexpected") end
  io.write(string.format("BENCH %d %d %d %d %d %d %d %f %f %f %f\\n", summary.requests, bad,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout, summary.errors.status,
    summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def run_wrk(url: str, key: str, method: str, body: bytes | None, expected: int, clients: int, seconds: float, timeout: float) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    threads = max(1, min(clients, os.cpu_count() or 1))
    env = {**os.environ, "BENCH_METHOD": method, "BENCH_BODY": (body or b"").decode(), "BENCH_EXPECTED": str(expected), "BENCH_KEY": key}
    before = _children_cpu()
    command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{seconds:.0f}s", f"--timeout={timeout:.0f}s", "-s", script.name, url]
    output = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + timeout + 30)
    cpu = _children_cpu() - before
    os.unlink(script.name)
    line = next((line for line in output.stdout.splitlines() if line.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {output.stdout}\n{output.stderr}")
    fields = line.split()[1:]
    requests, unexpected, connect, read, write, timeouts, _status = (int(x) for x in fields[:7])
    duration, p50, p99, maximum = (float(x) for x in fields[7:])
    notes = [f"{name} errors: {n}" for name, n in (("connect", connect), ("read", read), ("write", write), ("timeout", timeouts)) if n]
    return Result(
        "",
        clients,
        "wrk",
        round(duration, 2),
        requests,
        unexpected + connect + read + write + timeouts,
        round(requests / duration, 1),
        round(p50, 1),
        round(p99, 1),
        round(maximum, 1),
        round(cpu / max(requests, 1) * 1e6, 1),
        notes,
    )


async def _python_load(host: str, port: int, request: bytes, expected: int, clients: int, seconds: float, timeout: float, rate: float | None):
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + seconds
    status_line = re.compile(rb"HTTP/1\.[01] (\d{3})")
    begin = time.perf_counter()

    async def one_client(index: int) -> None:
        reader = writer = None
        sent = 0
        while time.monotonic() < stop_at:
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                started = time.perf_counter()
                if rate:  # open loop: this connection's share of the rate, on a fixed schedule; latency counts from when it was due
                    due = begin + (index + sent * clients) / rate
                    sent += 1
                    if due > started:
                        await asyncio.sleep(due - started)
                    started = due
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
                await asyncio.wait_for(reader.readexactly(length), timeout)
                latencies.append(time.perf_counter() - started)
                status = int(status_line.match(head).group(1))
                if status != expected:
                    errors[f"status {status}"] = errors.get(f"status {status}", 0) + 1
                if re.search(rb"(?i)\r\nconnection:\s*close", head):
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, AttributeError, ValueError) as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one_client(index) for index in range(clients)))
    return latencies, errors, time.monotonic() - started


def run_python(
    url: str, key: str, method: str, body: bytes | None, expected: int, clients: int, seconds: float, timeout: float, rate: float | None = None
) -> Result:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = (head + "\r\n").encode() + (body or b"")
    cpu_before = time.process_time()
    latencies, errors, duration = asyncio.run(_python_load(parts.hostname, parts.port, request, expected, clients, seconds, timeout, rate))
    cpu = time.process_time() - cpu_before
    latencies.sort()
    count = len(latencies)

    def pct(q: float) -> float | None:
        return round(latencies[min(count - 1, int(q * count))] * 1000, 1) if count else None

    failures = sum(errors.values())
    return Result(
        "",
        clients,
        "python",
        round(duration, 2),
        count + sum(n for name, n in errors.items() if not name.startswith("status")),
        failures,
        round(count / duration, 1),
        pct(0.5),
        pct(0.99),
        round(latencies[-1] * 1000, 1) if count else None,
        round(cpu / max(count, 1) * 1e6, 1),
        [f"{name}: {n}" for name, n in sorted(errors.items())],
    )


# --- report ----------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    lines = [
        "| scenario | clients | offered req/s | tool | requests | errors | req/s | p50 ms | p99 ms | max ms | server CPU ms / 1000 req | client CPU ms / 1000 req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.clients} | {f'{r.offered_rps:.0f}' if r.offered_rps else 'as fast as answered'} | {r.tool} | {r.requests} | {r.errors}{' (' + '; '.join(r.notes) + ')' if r.notes else ''} | {r.rps:.0f} | "
            f"{r.p50_ms} | {r.p99_ms} | {r.max_ms} | {r.server_cpu_ms_per_1000} | {r.client_cpu_ms_per_1000} |"
        )
    return "\n".join(lines)


def update_readme(markdown: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- bench:api_load -->", "<!-- /bench:api_load -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} … {end} block to replace")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(before + start + "\n" + markdown + "\n" + end + after, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("QDPO_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis-url", default=os.environ.get("QDPO_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="API processes (qdpo api --workers N; default: CPU cores)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per scenario (after a 2 s warm-up)")
    parser.add_argument("--timeout", type=float, default=30.0, help="a request unanswered this long counts as an error")
    parser.add_argument("--plan", default=DEFAULT_PLAN, help=f"scenario:clients[@rate], comma-separated (default {DEFAULT_PLAN})")
    parser.add_argument("--client", choices=("auto", "wrk", "python", "both"), default="auto", help="load generator (auto: wrk when installed)")
    parser.add_argument("--env", action="append", default=[], help="extra QDPO_*=value for the API processes (repeatable)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "api_load.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)

    tools = {"auto": ["wrk" if shutil.which("wrk") else "python"], "both": ["wrk", "python"]}.get(args.client, [args.client])
    if "wrk" in tools and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk); use --client python")
    plan = []
    for item in args.plan.split(","):
        name, clients = item.split(":")
        clients, _, rate = clients.partition("@")
        plan.append((name, int(clients), float(rate) if rate else None))
    extra_env = dict(item.split("=", 1) for item in args.env)
    load_before = os.getloadavg()
    started = time.time()
    results: list[Result] = []
    log_path = Path(tempfile.gettempdir()) / f"qdpo-bench-api-{os.getpid()}.log"
    with Deployment(args.database_url, args.redis_url, args.workers, log_path, extra_env) as deployment:
        job_ids = deployment.create_jobs(25)
        for name, clients, rate in plan:
            method, template, body, expected = SCENARIOS[name]
            url = deployment.base_url + template.format(job_id=job_ids[0])
            for tool in tools if rate is None else ["python"]:  # wrk has no fixed rate
                run = functools.partial(run_python, rate=rate) if tool == "python" else run_wrk
                run(url, deployment.key, method, body, expected, clients, 2, args.timeout)  # warm-up: connections, caches
                cpu_before = deployment.cpu_seconds()
                result = run(url, deployment.key, method, body, expected, clients, args.duration, args.timeout)
                result.offered_rps = rate
                result.server_cpu_ms_per_1000 = round((deployment.cpu_seconds() - cpu_before) / max(result.requests, 1) * 1e6, 1)
                result.scenario = name
                if result.requests == 0:
                    result.errors, result.notes = clients, [*result.notes, "nothing answered"]
                results.append(result)
                print(
                    f"{name:<11} {clients:>4} clients  {tool:<6} {result.rps:>8.1f} req/s  p99 {result.p99_ms} ms  errors {result.errors}  "
                    f"server CPU {result.server_cpu_ms_per_1000} ms / 1000 req",
                    flush=True,
                )
        server_errors = log_path.read_text(errors="replace").count("Traceback")
    load_after = os.getloadavg()
    machine = {**cpu_info(), "python": platform.python_version(), "platform": platform.platform()}
    config = {"workers": args.workers, "duration_s": args.duration, "timeout_s": args.timeout, "env": extra_env, "server_tracebacks": server_errors}
    load = {"loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after]}
    report = {"started": started, "machine": machine, "config": config, "load": load, "results": [asdict(r) for r in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    markdown = (
        f"`python bench/api_load.py` on {machine['model']} ({machine['cores']} cores), `qdpo api --workers {args.workers}` on "
        f"Postgres + Redis over loopback, load generator on the same cores, {args.duration:.0f} s per row; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min).\n\n" + table(results)
    )
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print()
    print(markdown)
    if server_errors:
        print(f"\nthe server logged {server_errors} traceback(s); see {log_path}")
    if args.update_readme:
        update_readme(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
