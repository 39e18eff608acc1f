"""Run a GGUF model (and LoRA adapter) in llama.cpp itself, through llama-cpp-python.

This is how qdpo checks that llama.cpp computes what the project computed: the tests and the
benchmark feed llama.cpp the very token ids the torch side used (no second tokenizer or chat
template in between) and read its next-token logits.

    with LlamaCpp("model-Q4_0.gguf", "adapter.gguf") as llm:
        logits = llm.logits(prompt_ids + answer_ids)   # (tokens, vocab) float32
        answer = llm.greedy(prompt_ids, 32, stop={eos})

`pip install llama-cpp-python` builds llama.cpp with cmake and a C++ compiler (`make install` does
it once, into .venv). The KV cache is kept in float32 here (llama.cpp's default is float16) so
that the comparison measures the weights and the adapter, not the cache's rounding.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

INSTALL_HINT = "llama-cpp-python is not installed: run `make install` (it builds llama.cpp once, about 10-15 minutes) or `pip install llama-cpp-python`"


def require_llama_cpp():
    """The llama_cpp module, or an ImportError that says how to get it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return llama_cpp


@contextmanager
def _without_weight_repacking(llama_cpp):
    """Models loaded inside keep their weights in llama.cpp's plain CPU buffers (`use_extra_bufts` off,
    what `llama-cli --no-repack` does).

    The extra buffer types repack weights for the CPU's fastest kernels — AMX tiles on CPUs that have
    them, interleaved Q4_0 blocks on AVX2/AVX-512. With a LoRA adapter loaded, the AMX path crashed
    inside llama_decode on an AMX CPU (a segmentation fault in each of three runs, in the suite and
    outside it); without repacking the same model, adapter and tokens run, with llama.cpp's plain
    kernels, somewhat slower. `Llama` takes no option for it, so its default parameters are wrapped
    for the duration of the load.
    """
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


class LlamaCpp:
    def __init__(
        self,
        model: str | Path,
        adapter: str | Path | None = None,
        n_ctx: int = 1024,
        threads: int | None = None,
        f32_cache: bool = True,
    ):
        import os

        llama_cpp = require_llama_cpp()
        options: dict[str, Any] = {}
        if f32_cache:
            options.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        with _without_weight_repacking(llama_cpp):
            self.llm = llama_cpp.Llama(
                model_path=str(model),
                lora_path=str(adapter) if adapter else None,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                logits_all=True,
                n_threads=threads or max(1, min(4, os.cpu_count() or 1)),
                n_gpu_layers=0,
                seed=0,
                verbose=False,
                **options,
            )

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def logits(self, ids: list[int]):
        """Next-token logits after every position of `ids`: (len(ids), vocab) numpy float32."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int], max_new_tokens: int, stop: set[int] | None = None) -> list[int]:
        """The greedy answer to `prompt` (token ids), at most max_new_tokens long, ending at a stop token."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(prompt))
        answer: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            answer.append(token)
            if stop and token in stop:
                break
            self.llm.eval([token])
        return answer


def flip_rate(llm: LlamaCpp, prompts: list[list[int]], answers: list[list[int]], fp_argmax: list) -> dict:
    """Token-flip rate of the llama.cpp model on FP answers (teacher-forced), against FP's argmax per answer position.

    `fp_argmax[i]` holds the FP model's argmax at the positions that predict answers[i]'s tokens.
    """
    import numpy as np

    flips = count = 0
    for prompt, answer, reference in zip(prompts, answers, fp_argmax):
        if not answer:
            continue
        logits = llm.logits(prompt + answer)
        predicted = logits[len(prompt) - 1 : len(prompt) + len(answer) - 1].argmax(-1)
        flips += int((predicted != np.asarray(reference)).sum())
        count += len(answer)
    return {"token_flip_rate": flips / max(count, 1), "tokens": count}


def held_out_metrics(workdir: str | Path, max_new_tokens: int, on_prompt=None) -> dict:
    """A finished GGUF job's held-out metrics measured in llama.cpp: {"ptq": ..., "aligned": ...}.

    For the exported base alone and base + adapter.gguf: token-flip rate and KL(FP ‖ llama.cpp) per
    answer token, teacher-forced on the FP answers (the FP side is the project's torch teacher), and
    exact match / ROUGE-L of llama.cpp's own greedy answers against the FP ones.
    """
    import json

    import numpy as np
    import torch

    from qdpo_core.evaluate import agreement_metrics
    from qdpo_core.models import load_full_precision, load_tokenizer, resolve_model_dir

    workdir = Path(workdir)
    export_dir = workdir / "export"
    manifest = json.loads((export_dir / "manifest.json").read_text())
    base = manifest["gguf"]["base"]
    if not base.get("included"):
        raise ValueError(f"the job aligned the registered file {base['file']}; pass that file's directory as the export's")
    rows = [json.loads(line) for line in (workdir / "baseline" / "fp_responses.jsonl").read_text().splitlines()]
    model_dir = resolve_model_dir(manifest["base_model"]["name"])
    teacher, tokenizer = load_full_precision(model_dir, "cpu"), load_tokenizer(model_dir)
    fp_logits = []
    for row in rows:
        with torch.no_grad():
            logits = teacher(torch.tensor([row["prompt_ids"] + row["ids"]])).logits[0].float()
        fp_logits.append(torch.log_softmax(logits[len(row["prompt_ids"]) - 1 : -1], -1).numpy())
    results = {}
    for label, adapter in (("ptq", None), ("aligned", export_dir / "adapter.gguf")):
        flips = kl = count = 0.0
        texts = []
        with LlamaCpp(export_dir / base["file"], adapter) as llm:
            for number, (row, fp_logp) in enumerate(zip(rows, fp_logits), start=1):
                logits = llm.logits(row["prompt_ids"] + row["ids"])[len(row["prompt_ids"]) - 1 : -1]
                logp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
                flips += float((logp.argmax(-1) != fp_logp.argmax(-1)).sum())
                kl += float((np.exp(fp_logp) * (fp_logp - logp)).sum())
                count += len(row["ids"])
                answer = llm.greedy(row["prompt_ids"], max_new_tokens, {tokenizer.eos_token_id})
                texts.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
                if on_prompt:
                    on_prompt(label, number, len(rows))
        results[label] = {"token_flip_rate": flips / max(count, 1), "kl": max(kl / max(count, 1), 0.0), "tokens": int(count)}
        results[label].update(agreement_metrics([r["text"] for r in rows], texts))
    return results
