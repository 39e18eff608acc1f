"""Translate between the API's job shape and qdpo_core's PipelineSpec.

The API speaks in `method.hyperparameters.beta` and `dataset.file_id`; the pipeline speaks in
`train.beta` and `dataset.prompts` (a path). Building the spec here, before anything is stored,
means a job the pipeline would reject never reaches the database or a worker, and the error
names the field the way the client wrote it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Row

from api.core.errors import ApiError
from api.schemas.jobs import AdapterInfo, JobCreate, JobPublic, Progress
from qdpo_core import registry
from qdpo_core.config import PipelineSpec
from qdpo_core.errors import QdpoError, SpecError
from qdpo_core.outbound import OutboundPolicy
from service import tables as models
from service.fields import api_message, api_param
from service.inputs import INPUT_FILES

# Methods whose dataset file holds preference pairs rather than prompts.
PREFERENCES_METHODS = ("dpo",)


def to_api_error(exc: SpecError) -> ApiError:
    return ApiError(422, exc.code, api_message(exc.message, exc.param), api_param(exc.param))


def expected_purpose(method: str) -> str:
    return "preferences" if method in PREFERENCES_METHODS else "prompts"


def check_model(name: str) -> None:
    # Only registered names: a client must not make a worker read arbitrary server paths or the hub.
    if registry.lookup(name) is None:
        offered = ", ".join(m.name for m in registry.registered_models())
        raise ApiError(422, "model_not_available", f"model: {name!r} is not offered by this deployment; use one of: {offered} (GET /v1/models)", "model")


def build_spec(request: JobCreate, outbound_policy: OutboundPolicy | None = None) -> tuple[dict, dict]:
    """Validate a creation request into (normalised PipelineSpec dict, {dataset field: file id}).

    With an `outbound_policy`, every endpoint URL the job would call is resolved and checked too.
    """
    check_model(request.model)
    method = request.method.type if request.method else "qdpo"
    dataset = request.dataset.given() if request.dataset else {}
    inputs: dict[str, str] = {}
    if file_id := dataset.pop("file_id", None):
        inputs["pairs" if expected_purpose(method) == "preferences" else "prompts"] = file_id
    if eval_file_id := dataset.pop("eval_file_id", None):
        inputs["eval_prompts"] = eval_file_id
    raw: dict = {"method": method, "model": {"name": request.model}, "dataset": dataset}
    for section, value in (("quantization", request.quantization), ("generation", request.generation), ("eval", request.eval)):
        if value is not None:
            raw[section] = value.given()
    if request.method is not None:
        sections = (
            ("train", request.method.hyperparameters),
            ("rlaif", request.method.rlaif),
            ("factuality", request.method.factuality),
            ("auto", request.method.auto),
        )
        for section, value in sections:
            if value is not None:
                raw[section] = value.given()
        for other in ("rlaif", "factuality", "auto"):
            if getattr(request.method, other) is not None and method != other:
                raise ApiError(
                    422, "invalid_spec", f"method.{other}: settings for method '{other}' were given but method.type is {method!r}", f"method.{other}"
                )
    if references_file_id := raw.get("factuality", {}).pop("references_file_id", None):
        inputs["references"] = references_file_id
    # File ids stand in for the paths while the spec is checked; the worker puts the real paths there.
    for name, file_id in inputs.items():
        raw.setdefault(INPUT_FILES[name].section, {})[INPUT_FILES[name].key] = file_id
    if request.seed is not None:
        raw["seed"] = request.seed
    _check_labelers(raw)
    try:
        parsed = PipelineSpec.from_dict(raw)
        registry.check_quantization(parsed.model.name, parsed.quantization, parsed.model.dtype)  # e.g. method gguf on a model with no GGUF
        spec = parsed.to_dict()
    except SpecError as exc:
        raise to_api_error(exc) from exc
    except (TypeError, ValueError) as exc:  # a value of the right JSON type but unusable (e.g. a comparison failed)
        raise ApiError(422, "invalid_spec", f"the job settings are invalid: {exc}", None) from exc
    if outbound_policy is not None:
        _check_endpoints(spec, outbound_policy)
    return spec, inputs


def _check_endpoints(spec: dict, policy: OutboundPolicy) -> None:
    """An endpoint a worker would call must be one this deployment lets it call (no SSRF to private networks)."""
    for section, key, api_path in _LABELER_PLACES:
        labeler = (spec.get(section) or {}).get(key)
        if not labeler or labeler.get("kind") != "openai":
            continue
        if section != "eval" and spec["method"] != section:
            continue  # settings of a method the job does not use are never called
        try:
            policy.check_url(labeler["base_url"], f"{api_path}.base_url")
        except QdpoError as exc:
            raise ApiError(422, exc.code, exc.message, exc.param) from exc


# Where labeler settings can appear in a request, and how the API names each place.
_LABELER_PLACES = (("eval", "judge", "eval.judge"), ("rlaif", "labeler", "method.rlaif.labeler"), ("factuality", "labeler", "method.factuality.labeler"))
LABELER_KEY_PREFIX = "QDPO_LABELER_"


def _check_labelers(raw: dict) -> None:
    """A client may not point a worker at server paths or hub ids, nor read arbitrary server secrets.

    A local labeler must be a model this deployment offers; an endpoint's API key can only come from
    an environment variable the operator named for that purpose (QDPO_LABELER_*).
    """
    for section, key, api_path in _LABELER_PLACES:
        value = (raw.get(section) or {}).get(key)
        if not isinstance(value, dict):
            continue
        if value.get("kind", "local") == "local" and "model" in value and registry.lookup(value["model"]) is None:
            offered = ", ".join(m.name for m in registry.registered_models())
            raise ApiError(
                422,
                "model_not_available",
                f"{api_path}.model: {value['model']!r} is not offered by this deployment; use one of: {offered}",
                f"{api_path}.model",
            )
        env = value.get("api_key_env")
        if env is not None and not str(env).startswith(LABELER_KEY_PREFIX):
            raise ApiError(
                422,
                "invalid_spec",
                f"{api_path}.api_key_env: must name a variable starting with {LABELER_KEY_PREFIX} (set by the operator for labelers); got {env!r}",
                f"{api_path}.api_key_env",
            )


def _epoch(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_public(job: models.Job | Row) -> JobPublic:
    """What the API shows of a job: from a Job, or from a row of its shown columns (service.crud.jobs)."""
    spec = job.spec
    dataset = {k: v for k, v in spec["dataset"].items() if k not in ("prompts", "pairs", "eval_prompts")}
    dataset["file_id"] = job.inputs.get("prompts") or job.inputs.get("pairs")
    dataset["eval_file_id"] = job.inputs.get("eval_prompts")
    method = {"type": spec["method"], "hyperparameters": spec["train"]}
    if spec["method"] in ("rlaif", "factuality", "auto"):
        method[spec["method"]] = dict(spec[spec["method"]])
    if spec["method"] == "factuality":
        method["factuality"].pop("references", None)
        method["factuality"]["references_file_id"] = job.inputs.get("references")
    adapter = None
    if job.status == models.SUCCEEDED and job.adapter_sha256:
        adapter = AdapterInfo(bytes=job.adapter_bytes or 0, sha256=job.adapter_sha256, url=f"/v1/jobs/{job.id}/adapter")
    return JobPublic(
        id=job.id,
        status=job.status,
        stage=job.stage,
        model=job.model,
        quantization=spec["quantization"],
        dataset=dataset,
        method=method,
        generation=spec["generation"],
        eval=spec["eval"],
        seed=spec["seed"],
        suffix=job.suffix,
        metadata=job.metadata_ or {},
        progress=Progress(**job.progress) if job.progress else None,
        error=job.error,
        fine_tuned_model=job.fine_tuned_model,
        adapter=adapter,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        created_at=_epoch(job.created_at),
        started_at=_epoch(job.started_at),
        finished_at=_epoch(job.finished_at),
    )
