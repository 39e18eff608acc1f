"""The before/after report: FP vs PTQ-only vs aligned on held-out prompts, as JSON and as a table."""

from __future__ import annotations

from typing import Any

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
    report: dict[str, Any] = {"fp": fp, "ptq": ptq, "aligned": aligned, "gap_closed": gap_closed(fp, ptq, aligned)}
    init = extra.get("init") or {}
    if init.get("metrics"):
        report["init_gap_closed"] = gap_closed(fp, ptq, init["metrics"])
    report.update(extra)
    report["verdict"] = verdict(report, extra.get("selected_checkpoint"), init)
    return report


def _closed_phrase(closed: dict) -> str:
    parts = [f"{closed[key]:.0%} of the PTQ→FP {label} gap" for key, label in (("token_flip_rate", "token-flip"), ("kl", "KL")) if closed.get(key) is not None]
    return " and ".join(parts)


def verdict(report: dict, selected_checkpoint: int | None, init: dict | None = None) -> str:
    init = init or {}
    closed = _closed_phrase(report["gap_closed"])
    initialised = init.get("init") not in (None, "identity") and init.get("kept")
    sentences = []
    if init.get("init") not in (None, "identity") and not init.get("kept"):
        sentences.append(f"The {init['init']} init did not beat PTQ-only on held-out data, so training started from the identity adapter.")
    if selected_checkpoint == 0 and not initialised:
        sentences.append("No checkpoint beat PTQ-only on held-out data; the exported adapter is the identity (the PTQ-only model).")
        return " ".join(sentences)
    if not closed:
        return " ".join(sentences + ["PTQ-only already matched full precision on these prompts."])
    if report.get("auto"):
        sentences.append(
            f"Method auto exported {report['auto']['winner']}, the best of {', '.join(c['name'] for c in report['auto']['candidates'])} on held-out data."
        )
    if selected_checkpoint == 0:
        sentences.append(f"The {init['init']} init alone (no training step beat it) closed {closed}.")
    else:
        sentences.append(f"The aligned model closed {closed}.")
        if initialised and report.get("init_gap_closed"):
            sentences.append(f"The {init['init']} init alone, before training, closed {_closed_phrase(report['init_gap_closed'])}.")
    return " ".join(sentences)


def _fmt(value, pattern: str) -> str:
    if value is None:
        return "–"
    if "%" in pattern and abs(value) < 0.005:
        value = 0.0  # no "-0%" for a change that rounds away
    return pattern.format(value)


def markdown_table(report: dict) -> str:
    init = (report.get("init") or {}).get("metrics") if (report.get("init") or {}).get("kept") else None
    head = "| metric | FP | PTQ-only |" + (f" {report['init']['init']} init |" if init else "") + " aligned | gap closed |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for key, label, pattern in ROWS:
        if key not in report["aligned"] and key not in report["ptq"]:
            continue
        closed = report["gap_closed"].get(key)
        arrow = "↑" if key in HIGHER_IS_BETTER or key == "judge_win_rate" else "↓"
        init_cell = f" {_fmt(init.get(key), pattern)} |" if init else ""
        lines.append(
            f"| {label} {arrow} | {_fmt(report['fp'].get(key), pattern)} | {_fmt(report['ptq'].get(key), pattern)} |{init_cell} "
            f"{_fmt(report['aligned'].get(key), pattern)} | {_fmt(closed, '{:.0%}')} |"
        )
    return "\n".join(lines)


def candidates_table(report: dict) -> str:
    """Method auto: every candidate's held-out metrics (teacher-forced), the winner marked."""
    auto = report["auto"]
    lines = [
        f"## Method auto: {auto['winner']} won",
        "",
        "| candidate | token-flip rate ↓ | KL ↓ | perplexity ↓ | gap closed (flip / KL) | steps | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in auto["candidates"]:
        closed = gap_closed(report["fp"], report["ptq"], row["metrics"])
        name = f"**{row['name']}** (exported)" if row["name"] == auto["winner"] else row["name"]
        m = row["metrics"]
        lines.append(
            f"| {name} | {_fmt(m.get('token_flip_rate'), '{:.1%}')} | {_fmt(m.get('kl'), '{:.4f}')} | {_fmt(m.get('perplexity'), '{:.3f}')} | "
            f"{_fmt(closed.get('token_flip_rate'), '{:.0%}')} / {_fmt(closed.get('kl'), '{:.0%}')} | {row['steps']} | {row.get('seconds', '–')} |"
        )
    return "\n".join(lines)


def _compute_sentence(compute: dict) -> str:
    if not compute.get("dtype"):
        return ""
    compiled = " (training steps through torch.compile'd layers)" if compute.get("compiled_training") else ""
    return f" Computed on {compute['device']} in {compute['dtype']}{compiled}."


def markdown_report(report: dict) -> str:
    head = [
        f"# qdpo report: {report.get('method', '?')} on {report.get('model', '?')} ({report.get('quantization_label', '?')})",
        "",
        f"Held-out prompts: {report.get('eval_prompts', '?')}. Selected checkpoint: step {report.get('selected_checkpoint')}."
        + _compute_sentence(report.get("compute") or {}),
        "",
        markdown_table(report),
        "",
        report.get("verdict", ""),
    ]
    if report.get("judge"):
        head += ["", report["judge"]["sentence"]]
    if report.get("auto"):
        head += ["", candidates_table(report)]
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
