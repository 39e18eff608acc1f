"""`make demo`: the whole product in one run, on this machine, in a few minutes.

    python -m qdpo_cli.demo

1. starts the embedded service (`qdpo serve`: SQLite, filesystem broker, one worker process);
2. creates a job on the bundled SmolLM2-135M-Instruct through the REST API (built-in prompts): the
   adapter starts from the calibrated init (the quantization error, training-free) and is then
   distilled from the full-precision model (KD) — the combination the quality benchmark finds best;
3. follows it with a progress bar and prints the before/after report;
4. downloads the adapter (sha256 verified), loads it with peft onto the quantized base and shows one
   held-out answer before and after alignment.

Steps 1–3 use only the HTTP client. Step 4 imports torch and qdpo_core, here and nowhere else in
this package (`import qdpo_client` stays torch-free).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel

from qdpo_client import Client
from qdpo_client.types import Event

# Small enough for a 2-core CPU in a few minutes. 3-bit RTN leaves a wide gap to full precision (about
# half of the answer tokens flip), so what the adapter repairs shows; checkpoint selection on held-out
# KL keeps the export from ever being worse than the quantized model alone.
DEMO_JOB: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "quantization": {"method": "rtn", "bits": 3, "group_size": 64},
    "dataset": {"max_train_prompts": 16, "max_eval_prompts": 6},
    "generation": {"max_new_tokens": 32},
    "eval": {"max_new_tokens": 32},
    "method": {"type": "kd", "hyperparameters": {"init": "calibrated", "epochs": 3, "batch_size": 4, "learning_rate": 2e-4}},
    "suffix": "demo",
    "metadata": {"started_by": "make demo"},
}
OUT_DIR = Path("var") / "demo"
console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(port: int, key: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "QDPO_PORT": str(port), "QDPO_BOOTSTRAP_API_KEY": key}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        # The demo's service lives only as long as the demo: it leaves the user's client config alone.
        process = subprocess.Popen(
            [sys.executable, "-m", "qdpo_cli.main", "serve", "--no-client-config"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"qdpo serve exited ({process.returncode}); its log:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200 and b" ready." in log_path.read_bytes():
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_service(process)
    raise SystemExit(f"qdpo serve did not become ready within 120 s; see {log_path}")


def stop_service(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def print_event(event: Event) -> None:
    if event.type in ("log", "checkpoint") or event.level != "info":
        where = f"[{event.stage}] " if event.stage else ""
        console.print(f"  {where}{event.message}", style="yellow" if event.level == "warning" else "dim", markup=False, highlight=False)


def show_before_after(export_dir: Path) -> None:
    """One held-out prompt answered by the quantized model without and with the adapter."""
    from qdpo_core.export import load_aligned
    from qdpo_core.generate import Decoding, generate
    from qdpo_core.tokens import encode_prompt

    report = json.loads((export_dir / "report.json").read_text())
    quantized = json.loads((export_dir / "manifest.json").read_text())["quantization_label"]
    samples = report.get("samples") or []
    if not samples:
        console.print("(the report has no sample prompts to replay)")
        return
    sample = next((s for s in samples if s["aligned"] != s["ptq"]), samples[0])
    console.print("\nLoading the adapter with peft onto the quantized base …")
    warnings.filterwarnings("ignore", category=FutureWarning)
    model, tokenizer = load_aligned(export_dir, device="cpu")
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": sample["prompt"]}], 512).ids
    decoding = Decoding(max_new_tokens=DEMO_JOB["generation"]["max_new_tokens"])
    with model.disable_adapter():
        before = generate(model, tokenizer, [prompt], decoding)[0].text
    after = generate(model, tokenizer, [prompt], decoding)[0].text
    console.print(Panel(sample["prompt"], title="held-out prompt"))
    console.print(Panel(sample["fp"], title="full-precision model (the target)", border_style="blue"))
    console.print(Panel(before, title=f"{quantized}, before alignment", border_style="red"))
    console.print(Panel(after, title=f"{quantized} + qdpo adapter, after", border_style="green"))


def main() -> int:
    started = time.monotonic()
    key = f"qdpo_sk_demo_{secrets.token_urlsafe(24)}"
    port = free_port()
    console.rule("qdpo demo")
    console.print(f"Starting the embedded service on port {port} (log: {OUT_DIR / 'serve.log'}) …")
    service = start_service(port, key, OUT_DIR / "serve.log")
    try:
        with Client(f"http://127.0.0.1:{port}", api_key=key) as client:
            job = client.jobs.create(**DEMO_JOB)
            bits = f" {job.quantization['bits']}-bit" if job.quantization["method"] == "rtn" else ""
            console.print(f"Created {job.id}: calibrated init + KD on {job.model}, {job.quantization['method']}{bits}, built-in prompts. Following it …")
            job = client.jobs.wait(job.id, poll_interval=1.0, on_event=print_event)
            assert job.started_at is not None and job.finished_at is not None and job.adapter is not None  # wait() returns a succeeded job
            console.print(f"\n{job.id} succeeded in {job.finished_at - job.started_at} s as [bold]{job.fine_tuned_model}[/bold]\n")
            console.print(Markdown(client.jobs.report(job.id, markdown=True)))
            out = client.jobs.download_adapter(job.id, OUT_DIR)
            console.print(f"\nAdapter downloaded and verified (sha256 {job.adapter.sha256[:16]}…): {out}")
    finally:
        stop_service(service)
    show_before_after(out)
    console.rule(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
