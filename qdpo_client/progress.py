"""The progress bar `jobs.wait` draws: stage n/7, step/total within it, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from qdpo_client.types import Job


class JobProgress:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        if self.enabled:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[eta]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("queued", total=None, eta="")
        return self

    def __exit__(self, *_exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, job: Job) -> None:
        if self.bar is None or self.task is None:
            return
        progress = job.progress
        if progress is None or progress.stage is None:
            self.bar.update(self.task, description=job.status, total=None, completed=0, eta="")
            return
        if job.done:
            self.bar.update(self.task, description=f"{job.status} after {progress.stage}", total=1, completed=1, eta="")
            return
        stage = f"{job.status}: {progress.stage} ({progress.stage_index}/{progress.stage_count})"
        eta = f"eta {progress.eta_seconds:.0f}s" if progress.eta_seconds is not None else ""
        self.bar.update(self.task, description=stage, total=progress.total_steps, completed=progress.step or 0, eta=eta)

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)
