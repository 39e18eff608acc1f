"""What the pipeline reports while it runs.

`run_pipeline(..., on_event=callback)` calls `callback(Event)` for every stage change, progress tick,
training step, checkpoint and warning. A worker persists them; the CLI draws progress bars.
No torch here: the service imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# The stages in run order; each writes its output under the workdir and resumes from it.
STAGES = ("prepare", "quantize", "baseline", "init", "pairs", "train", "evaluate", "export")

EVENT_TYPES = ("stage", "progress", "metrics", "checkpoint", "log")


@dataclass
class Event:
    type: str  # one of EVENT_TYPES
    stage: str | None
    message: str
    level: str = "info"  # info | warning | error
    step: int | None = None  # progress within the stage (1-based)
    total: int | None = None  # steps the stage will take, when known
    data: dict[str, Any] = field(default_factory=dict)  # metrics, paths, counts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EventCallback = Callable[[Event], None]


class Emitter:
    """Small helper the stages share: stamps the stage name, tolerates a missing callback."""

    def __init__(self, on_event: EventCallback | None, stage: str | None = None):
        self.on_event = on_event
        self.stage = stage

    def for_stage(self, stage: str) -> Emitter:
        return Emitter(self.on_event, stage)

    def emit(self, type: str, message: str, level: str = "info", step: int | None = None, total: int | None = None, **data: Any) -> None:
        if self.on_event is not None:
            self.on_event(Event(type=type, stage=self.stage, message=message, level=level, step=step, total=total, data=data))

    def log(self, message: str, level: str = "info", **data: Any) -> None:
        self.emit("log", message, level=level, **data)

    def warn(self, message: str, **data: Any) -> None:
        self.emit("log", message, level="warning", **data)

    def progress(self, step: int, total: int, message: str = "", **data: Any) -> None:
        self.emit("progress", message or f"{self.stage} {step}/{total}", step=step, total=total, **data)
