"""The before/after report: FP vs PTQ-only vs aligned on held-out prompts, as JSON and as a table."""

from __future__ import annotations

from qdpo_core.evaluate import HIGHER_IS_BETTER, gap_closed

ROWS = (
    ("token_flip_rate", "token-flip rate", "{:.1%}"),
    ("kl", "KL(FP‖model), nats/token", "{:.4f}"),
    ("perplexity", "perplexity of FP answers", "{:.3f}"),
    ("exact_match", "greedy exact match", "{:.1%}"),
    ("rouge_l", "greedy ROUGE-L vs FP", "{:.3f}"),
    ("cosine", "answer cosine vs FP", "{:.3f}"),
    ("judge_win_rate", "judge win-rate vs PTQ", "{:.1%}"),
)


def build_report(fp: dict, ptq: dict, aligned: dict, **extra) -> dict:
    report = {"fp": fp, "ptq": ptq, "aligned": aligned, "gap_closed": gap_closed(fp, ptq, aligned)}
    report["verdict"] = verdict(report, extra.get("selected_checkpoint"))
    report.update(extra)
    return report


def verdict(report: dict, selected_checkpoint: int | None) -> str:
    closed = report["gap_closed"]
    parts = []
    for key, label in (("token_flip_rate", "token-flip"), ("kl", "KL")):
        if closed.get(key) is not None:
            parts.append(f"{closed[key]:.0%} of the PTQ→FP {label} gap")
    if selected_checkpoint == 0:
        return "No checkpoint beat PTQ-only on held-out data; the exported adapter is the identity (the PTQ-only model)."
    return ("The aligned model closed " + " and ".join(parts) + ".") if parts else "PTQ-only already matched full precision on these prompts."


def _fmt(value, pattern: str) -> str:
    if value is None:
        return "–"
    if "%" in pattern and abs(value) < 0.005:
        value = 0.0  # no "-0%" for a change that rounds away
    return pattern.format(value)


def markdown_table(report: dict) -> str:
    lines = ["| metric | FP | PTQ-only | aligned | gap closed |", "|---|---|---|---|---|"]
    for key, label, pattern in ROWS:
        if key not in report["aligned"] and key not in report["ptq"]:
            continue
        closed = report["gap_closed"].get(key)
        arrow = "↑" if key in HIGHER_IS_BETTER or key == "judge_win_rate" else "↓"
        lines.append(
            f"| {label} {arrow} | {_fmt(report['fp'].get(key), pattern)} | {_fmt(report['ptq'].get(key), pattern)} | "
            f"{_fmt(report['aligned'].get(key), pattern)} | {_fmt(closed, '{:.0%}')} |"
        )
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    head = [
        f"# qdpo report: {report.get('method', '?')} on {report.get('model', '?')} ({report.get('quantization_label', '?')})",
        "",
        f"Held-out prompts: {report.get('eval_prompts', '?')}. Selected checkpoint: step {report.get('selected_checkpoint')}.",
        "",
        markdown_table(report),
        "",
        report.get("verdict", ""),
    ]
    if report.get("judge"):
        head += ["", report["judge"]["sentence"]]
    for note in (report.get("pairs") or {}).get("notes", []):
        head += ["", f"Note on the training pairs: {note}."]
    samples = report.get("samples") or []
    if samples:
        head += ["", "## Sample answers", ""]
        for sample in samples:
            head += [f"**Prompt:** {sample['prompt']}", "", f"- FP: {sample['fp']}", f"- PTQ-only: {sample['ptq']}", f"- aligned: {sample['aligned']}", ""]
    return "\n".join(head).rstrip() + "\n"


def print_report(report: dict) -> None:
    """Pretty table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.get('method')} · {report.get('model')} · {report.get('quantization_label')}")
    for column in ("metric", "FP", "PTQ-only", "aligned", "gap closed"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label, pattern in ROWS:
        if key not in report["aligned"] and key not in report["ptq"]:
            continue
        table.add_row(
            label,
            _fmt(report["fp"].get(key), pattern),
            _fmt(report["ptq"].get(key), pattern),
            _fmt(report["aligned"].get(key), pattern),
            _fmt(report["gap_closed"].get(key), "{:.0%}"),
        )
    console = Console()
    console.print(table)
    console.print(report.get("verdict", ""))
    if report.get("judge"):
        console.print(report["judge"]["sentence"])
