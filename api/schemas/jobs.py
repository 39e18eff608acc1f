"""Jobs: what a client sends to create one, and what it reads back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from api.schemas.common import StrictInt, Text
from api.schemas.spec_models import (
    AutoSettings,
    DatasetOptions,
    EvalSettings,
    FactualitySettings,
    GenerationSettings,
    Hyperparameters,
    QuantizationSettings,
    RLAIFSettings,
)
from qdpo_core.config import METHODS
from service.tables import JOB_STATUSES

JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
MethodType = Literal[METHODS]  # type: ignore[valid-type]
MAX_METADATA_PAIRS = 16
ObjectId = Annotated[Text, StringConstraints(max_length=64)]


class DatasetSettings(DatasetOptions):
    """Training data: an uploaded file, or none for the built-in prompt set."""

    file_id: ObjectId | None = Field(
        None, description="Uploaded file: purpose 'prompts' for qdpo/kd/rlaif/factuality, 'preferences' for dpo. Empty = built-in prompts."
    )
    eval_file_id: ObjectId | None = Field(None, description="Uploaded prompts file held out for evaluation; empty = a seeded split of the training prompts.")


class FactualityOptions(FactualitySettings):
    """Method factuality: FactTune-style pairs."""

    references_file_id: ObjectId | None = Field(None, description="scorer 'reference': an uploaded file of purpose 'references' ({'text', 'title'?} per line).")


class MethodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: MethodType = Field(
        "qdpo",
        description="qdpo (FP answer chosen, quantized answer rejected), dpo (your preference pairs), kd (distillation baseline), rlaif, factuality, "
        "auto (try several from the calibrated init, export the best).",
    )
    hyperparameters: Hyperparameters | None = None
    rlaif: RLAIFSettings | None = Field(None, description="Only for type 'rlaif'.")
    factuality: FactualityOptions | None = Field(None, description="Only for type 'factuality'.")
    auto: AutoSettings | None = Field(None, description="Only for type 'auto'.")


class JobCreate(BaseModel):
    """A job: align one quantized model with one method. Every omitted setting takes the pipeline's default."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m-instruct",
                    "quantization": {"method": "rtn", "bits": 3, "group_size": 64},
                    "dataset": {"file_id": "file_8f2c1e0a9b7d6c5e4f3a2b1c", "eval_fraction": 0.1},
                    "method": {
                        "type": "qdpo",
                        "hyperparameters": {"beta": 0.1, "learning_rate": 1e-4, "epochs": 2, "batch_size": 4, "lora_rank": 16, "loss": "sigmoid"},
                    },
                    "seed": 0,
                    "suffix": "support-bot",
                    "metadata": {"team": "search"},
                }
            ]
        },
    )

    model: Annotated[Text, StringConstraints(max_length=200)] = Field(
        "smollm2-135m-instruct", description="A base model this deployment offers (GET /v1/models).", examples=["smollm2-135m-instruct"]
    )
    quantization: QuantizationSettings | None = None
    dataset: DatasetSettings | None = None
    method: MethodSettings | None = None
    generation: GenerationSettings | None = None
    eval: EvalSettings | None = None
    seed: StrictInt | None = Field(None, description="Seeds data order, splits, sampling and LoRA init (0 to 2^32 - 1). Default: 0.")
    suffix: Text | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Up to 64 letters, digits, '.', '_' or '-', added to the fine-tuned model name.",
    )
    metadata: dict[Text, Text] | None = Field(None, description=f"Up to {MAX_METADATA_PAIRS} key/value pairs (keys up to 64 characters, values up to 512).")

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs; got {len(value)}")
        for key, item in value.items():
            if not key or len(key) > 64:
                raise ValueError(f"key {key[:70]!r}: use 1 to 64 characters")
            if len(item) > 512:
                raise ValueError(f"value of {key!r}: use at most 512 characters")
        return value


class Progress(BaseModel):
    stage: str | None = Field(None, examples=["train"])
    stage_index: int | None = Field(None, description="1-based position of the stage in the run.", examples=[5])
    stage_count: int | None = Field(None, examples=[7])
    step: int | None = Field(None, examples=[12])
    total_steps: int | None = Field(None, examples=[76])
    eta_seconds: float | None = Field(None, description="Estimated seconds until this stage finishes.", examples=[95])


class JobError(BaseModel):
    code: str = Field(examples=["model_unavailable"])
    message: str
    param: str | None = None


class AdapterInfo(BaseModel):
    bytes: int
    sha256: str
    url: str = Field(examples=["/v1/jobs/job_41d2/adapter"])


class JobPublic(BaseModel):
    id: str = Field(examples=["job_41d2a7c9e0f1b3d5a6c8e0f2"])
    object: Literal["job"] = "job"
    status: JobStatus
    stage: str | None = Field(None, description="Current pipeline stage: prepare, quantize, pairs, baseline, train, evaluate, export.")
    model: str
    quantization: dict[str, Any]
    dataset: dict[str, Any]
    method: dict[str, Any] = Field(description="{type, hyperparameters, …} with every default filled in.")
    generation: dict[str, Any]
    eval: dict[str, Any]
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    progress: Progress | None = None
    error: JobError | None = None
    fine_tuned_model: str | None = Field(None, description="Name of the result once the job succeeded.")
    adapter: AdapterInfo | None = None
    attempts: int = Field(0, description="Runs started so far (more than one after a worker was lost or an internal error).")
    cancel_requested: bool = False
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None


class EventPublic(BaseModel):
    id: str = Field(description="evt_<n>: the job's n-th event (numbered per job, from 1).", examples=["evt_12"])
    object: Literal["job.event"] = "job.event"
    created_at: float
    type: str = Field(description="stage, progress, metrics, checkpoint, log or status.", examples=["stage"])
    stage: str | None = None
    level: str = Field("info", examples=["info"])
    message: str
    step: int | None = None
    total: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class MetricPublic(BaseModel):
    step: int = Field(description="Optimizer step.")
    total_steps: int | None = None
    values: dict[str, Any] = Field(description="loss, chosen_reward, rejected_reward, reward_margin, reward_accuracy, learning_rate, epoch, …")


class MetricList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricPublic]


class CheckpointPublic(BaseModel):
    object: Literal["job.checkpoint"] = "job.checkpoint"
    step: int
    metrics: dict[str, Any] = Field(description="Held-out metrics at this checkpoint (kl, token_flip_rate).")
    is_best: bool
    created_at: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
