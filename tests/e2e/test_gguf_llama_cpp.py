"""llama.cpp agrees: a GGUF Q4_0 job on the real bundled SmolLM2-135M, its exported pair run in llama.cpp itself.

The job aligns the Q4_0 model (training-free: the calibrated init, the cheapest adapter that is
really non-zero), exports model-Q4_0.gguf + adapter.gguf, and llama-cpp-python loads them. llama.cpp
is fed the very token ids the torch side used. Three claims:

(a) with the adapter, llama.cpp's next-token logits are the project's torch numbers for the same
    GGUF base + LoRA. They cannot be bit-equal: llama.cpp's CPU kernels quantize the activations to
    8 bits (Q8_0 blocks) inside every product with a quantized weight, which no weight reproduces;
    an F32 GGUF of this model matches torch to 1e-4 (the unit tests show the adapter does too on an
    F32 base). So the tolerance is relative to that floor, measured on the base alone: the adapter
    may add at most 25% + 0.02 nats to the mean |Δlogit| (measured here: 0.26 without, 0.22 with a
    uniform rank-16 adapter, 0.25 with the default per-layer ranks), while its own effect on the
    logits is at least eight times larger (measured: 2.5), and the change the adapter makes in
    llama.cpp points the same way as in torch (cosine > 0.95; measured 0.99). Before any of that,
    adapter.gguf itself is checked: every tensor pair, at its own rank, scaled by llama.cpp's
    alpha / rank, is exactly PEFT's scaling·B·A of that layer (in llama.cpp's row order);
(b) the adapter changes llama.cpp's greedy answer on at least one prompt (measured: all of them);
(c) the report's held-out token-flip rate of the aligned model, recomputed through llama.cpp on the
    held-out prompts, is within 0.05 of the report's figure (measured: 2 points on 131 tokens).
    Each answer position where llama.cpp's argmax and torch's differ can move the count by one,
    so the difference is also bounded by the share of such positions, which is asserted too.

Without llama-cpp-python these tests fail and say how to install it; they never skip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qdpo_core import gguf_files, registry
from qdpo_core.config import PipelineSpec, QuantSpec
from qdpo_core.export import load_aligned, verify
from qdpo_core.gguf_runtime import LlamaCpp, flip_rate, require_llama_cpp
from qdpo_core.models import gguf_file_for, load_full_precision, load_tokenizer, resolve_model_dir
from qdpo_core.pipeline import run_pipeline
from qdpo_core.quantize import load_quantized

pytestmark = pytest.mark.e2e

FLIP_TOLERANCE = 0.05
ADAPTER_MISMATCH_FACTOR, ADAPTER_MISMATCH_SLACK = 1.25, 0.02


@pytest.fixture(scope="module", autouse=True)
def _registry_as_it_was():
    """Models these tests register are gone afterwards (other tests' deployments share this process's registry)."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture(scope="module")
def q4_job(tmp_path_factory):
    require_llama_cpp()  # fail at once, with the install command, when llama.cpp is not there
    spec = PipelineSpec.from_dict(
        {
            "method": "kd",
            "model": {"name": "smollm2-135m-instruct"},
            "quantization": {"method": "gguf", "type": "Q4_0"},
            "dataset": {"max_train_prompts": 8, "max_eval_prompts": 6},
            "generation": {"max_new_tokens": 24, "batch_size": 8},
            "eval": {"max_new_tokens": 24},
            # training-free repair: the calibrated init (per-channel form: seconds, not minutes) is the adapter
            "train": {"epochs": 0, "init": "calibrated", "init_max_full_gram_dim": 0},
        }
    )
    workdir = tmp_path_factory.mktemp("gguf-q4")
    result = run_pipeline(spec, workdir)
    return workdir, result


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _adapter_gguf_is_what_peft_computes(export_dir, ranks: dict[str, int]) -> None:
    """Each tensor pair of adapter.gguf, at its own rank and scaled by alpha / rank as llama.cpp does, is
    PEFT's scaling·B·A of the same layer (per-layer ranks and alphas included), rows in llama.cpp's order."""
    import gguf
    from peft.utils.other import get_pattern_key
    from safetensors.numpy import load_file

    config = json.loads((export_dir / "adapter" / "adapter_config.json").read_text())
    state = load_file(export_dir / "adapter" / "adapter_model.safetensors")
    reader = gguf.GGUFReader(export_dir / gguf_files.ADAPTER_FILE)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].parts[-1][0])
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    model_config = gguf_files.fp_config(resolve_model_dir("smollm2-135m-instruct"))
    tensor_map = gguf_files.name_map(model_config)
    checked = set()
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = state[key.replace("lora_A", "lora_B")].astype(np.float64)
        layer_alpha = float(config["alpha_pattern"].get(get_pattern_key(list(config["alpha_pattern"]), module), config["lora_alpha"]))
        expected = layer_alpha / a.shape[0] * b @ a.astype(np.float64)
        base = gguf_files.gguf_name(module + ".weight", tensor_map)
        heads = gguf_files.heads_for(base, model_config)
        if heads:
            expected = gguf_files.permute_rows(expected, *heads)
        ga, gb = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        assert ga.shape[0] == a.shape[0], (module, ga.shape, a.shape)
        assert np.abs(alpha / ga.shape[0] * gb @ ga - expected).max() <= 1e-6 * max(1.0, np.abs(expected).max()), module
        checked.add(module)
    assert checked == {name for name, rank in ranks.items() if rank}  # every layer with an adapter, no other


def test_the_exported_pair_runs_in_llama_cpp_and_computes_what_torch_computed(q4_job):
    workdir, result = q4_job
    manifest = verify(result.export_dir)  # sha256 of adapter/, adapter.gguf, and the base model beside them
    base_file = result.export_dir / manifest["gguf"]["base"]["file"]
    assert base_file.name == "model-Q4_0.gguf" and manifest["gguf"]["base"]["tensor_types"] == {"F32": 61, "Q4_0": 210, "Q8_0": 1}
    assert result.report["init"]["kept"], "the calibrated init must beat PTQ-only here, or the adapter is the identity and proves nothing"

    assert len(set(result.report["init"]["ranks"].values())) > 1, "the default allocation gives the layers different ranks"
    _adapter_gguf_is_what_peft_computes(result.export_dir, result.report["init"]["ranks"])

    aligned, tokenizer = load_aligned(result.export_dir, device="cpu")
    rows = [json.loads(line) for line in (workdir / "baseline" / "fp_responses.jsonl").read_text().splitlines()]
    with LlamaCpp(base_file) as base_llm, LlamaCpp(base_file, result.export_dir / "adapter.gguf") as aligned_llm:
        # weights stay in plain CPU buffers: with the adapter, llama.cpp's AMX repacking crashes in llama_decode
        assert not aligned_llm.llm.model_params.use_extra_bufts and not base_llm.llm.model_params.use_extra_bufts
        floors, mismatches, effects, cosines = [], [], [], []
        for row in rows:
            ids = row["prompt_ids"] + row["ids"]
            ours = _torch_logits(aligned, ids)
            with aligned.disable_adapter():
                ours_base = _torch_logits(aligned, ids)
            theirs, theirs_base = aligned_llm.logits(ids), base_llm.logits(ids)
            floors.append(np.abs(theirs_base - ours_base).mean())
            mismatches.append(np.abs(theirs - ours).mean())
            effects.append(np.abs(ours - ours_base).mean())
            delta_ours, delta_theirs = (ours - ours_base).ravel(), (theirs - theirs_base).ravel()
            cosines.append(float(delta_ours @ delta_theirs / np.linalg.norm(delta_ours) / np.linalg.norm(delta_theirs)))
        floor, mismatch, effect = float(np.mean(floors)), float(np.mean(mismatches)), float(np.mean(effects))
        # (a) the adapter adds no disagreement beyond llama.cpp's own activation rounding, and it is far above that floor
        assert mismatch <= ADAPTER_MISMATCH_FACTOR * floor + ADAPTER_MISMATCH_SLACK, (mismatch, floor)
        assert effect > 8 * mismatch, (effect, mismatch)
        assert min(cosines) > 0.95, cosines

        # (b) the adapter changes llama.cpp's own greedy answers
        stop = {tokenizer.eos_token_id}
        changed = [aligned_llm.greedy(r["prompt_ids"], 24, stop) != base_llm.greedy(r["prompt_ids"], 24, stop) for r in rows]
        assert any(changed), "the adapter left every greedy answer of llama.cpp as it was"

        # (c) the report's held-out flip rates, recomputed through llama.cpp against the FP model's argmax
        fp = load_full_precision(resolve_model_dir("smollm2-135m-instruct"), "cpu")
        prompts, answers = [r["prompt_ids"] for r in rows], [r["ids"] for r in rows]
        fp_argmax, disagree, positions = [], 0, 0
        for prompt, answer in zip(prompts, answers):
            span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
            fp_argmax.append(_torch_logits(fp, prompt + answer)[span].argmax(-1))
            ours = _torch_logits(aligned, prompt + answer)[span].argmax(-1)
            disagree += int((aligned_llm.logits(prompt + answer)[span].argmax(-1) != ours).sum())
            positions += len(answer)
        via_llama = flip_rate(aligned_llm, prompts, answers, fp_argmax)
        ptq_via_llama = flip_rate(base_llm, prompts, answers, fp_argmax)
    report = result.report
    assert via_llama["tokens"] == report["aligned"]["tokens"] == positions
    difference = abs(via_llama["token_flip_rate"] - report["aligned"]["token_flip_rate"])
    assert difference <= FLIP_TOLERANCE and difference <= disagree / positions + 1e-9, (via_llama, report["aligned"], disagree)
    assert abs(ptq_via_llama["token_flip_rate"] - report["ptq"]["token_flip_rate"]) <= FLIP_TOLERANCE
    # and the repair is real in llama.cpp too: fewer flips than PTQ-only
    assert via_llama["token_flip_rate"] < ptq_via_llama["token_flip_rate"]


def test_a_k_quant_file_from_llama_quantize_is_aligned_as_it_is(tmp_path):
    """Bring your own GGUF on the real model: llama.cpp quantizes an F32 GGUF of the FP model to Q4_K_M;
    registered next to the FP model, the student is that file's weights and computes what llama.cpp computes."""
    llama_cpp = require_llama_cpp()
    fp_dir = resolve_model_dir("smollm2-135m-instruct")
    model_dir = tmp_path / "smollm2"  # the operator's directory: the FP model's files, and the GGUF beside them
    model_dir.mkdir()
    for path in fp_dir.iterdir():
        (model_dir / path.name).symlink_to(path)
    f32 = model_dir / "smollm2-F32.gguf"
    from safetensors.torch import load_file

    weights = load_file(fp_dir / "model.safetensors")
    template, _ = gguf_file_for(fp_dir)
    gguf_files.write_model(f32, template, fp_dir, "F32", lambda name: weights[name].float().numpy())
    q4km = model_dir / "smollm2-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(q4km).encode(), params) == 0
    f32.unlink()  # only the file the operator registers stays

    model = registry.register_model("smollm2-q4km", str(q4km))
    assert model.problem is None, model.problem
    file_info = model.quantizations["gguf"]["file"]
    assert file_info["file_type"] == "Q4_K_M" and {"Q4_K", "Q6_K"} & set(file_info["tensor_types"])  # K-quants (rows of 1536)
    registry.check_quantization("smollm2-q4km", QuantSpec(method="gguf"))

    student, info = load_quantized(resolve_model_dir("smollm2-q4km"), QuantSpec(method="gguf"), "cpu")
    assert info.packed_bytes == q4km.stat().st_size
    tokenizer = load_tokenizer(fp_dir)
    ids = list(
        tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    ids += tokenizer(" The sky looks blue because air scatters blue light more than red light.", add_special_tokens=False)["input_ids"]
    ours = _torch_logits(student, ids)
    fp = load_full_precision(fp_dir, "cpu")
    with LlamaCpp(q4km) as llm:
        theirs = llm.logits(ids)
    # llama.cpp's numbers are the student's, within its activation rounding (K-quant products round the
    # activations to 8 bits too): measured 0.35 mean |Δlogit| to the student, 1.03 between student and FP
    # (on this model Q4_K_M is mostly Q5_0 / Q8_0 fallbacks for its 576-wide rows, a mild quantization)
    assert np.abs(theirs - ours).mean() < 0.5 * np.abs(_torch_logits(fp, ids) - ours).mean()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.8
