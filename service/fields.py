"""How the API names the pipeline's settings, both ways.

The API speaks in `method.hyperparameters.beta` and `dataset.file_id`; qdpo_core speaks in
`train.beta` and `dataset.prompts` (a path). Errors from the pipeline are rewritten to the API's
names here, for the API (at creation) and for the worker (when a job fails) alike.
"""

from __future__ import annotations

import re

from service.inputs import INPUT_FILES

_PREFIXES = (("train.", "method.hyperparameters."), ("rlaif.", "method.rlaif."), ("factuality.", "method.factuality."), ("auto.", "method.auto."))
_RENAMES = {"method": "method.type", "model.name": "model", **{f"{f.section}.{f.key}": f.param for f in INPUT_FILES.values()}}


def api_param(spec_param: str | None) -> str | None:
    """`train.beta` -> `method.hyperparameters.beta`: pipeline field names as the client wrote them."""
    if spec_param is None:
        return None
    if spec_param in _RENAMES:
        return _RENAMES[spec_param]
    if spec_param.startswith("model."):
        return "model"
    for old, new in _PREFIXES:
        if spec_param.startswith(old):
            return new + spec_param[len(old) :]
    return spec_param


def api_message(message: str, spec_param: str | None) -> str:
    """Rewrite the leading `train.beta:` of a pipeline message to the API's field name."""
    param = api_param(spec_param)
    if spec_param and param and message.startswith(spec_param):
        return param + message[len(spec_param) :]
    return re.sub(r"^train\.", "method.hyperparameters.", message)


def fine_tuned_model_name(*, model: str, method: str, quantization: dict, suffix: str | None, job_id: str) -> str:
    bits = f"{quantization['bits']}bit" if quantization["method"] == "rtn" else ""
    parts = [model, f"{method}-{quantization['method']}{bits}"] + ([suffix] if suffix else []) + [job_id]
    return ":".join(parts)
