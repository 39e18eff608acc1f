"""GGUF quantization, registration and export on the tiny model, checked against gguf, transformers and llama.cpp itself.

- the student computes with exactly gguf's de-quantized values of the type each tensor is stored in;
- what qdpo writes, transformers' own GGUF loader reads back to the same weights (names, q/k row order);
- adapter.gguf has llama.cpp's LoRA layout, and llama.cpp (llama-cpp-python) applied to it computes
  what torch + PEFT compute: exactly on an F32 base, within its 8-bit activation rounding on Q4_0;
- bad files and impossible jobs are refused with the field and the fix.

llama-cpp-python is required: without it these tests fail and say how to install it (`make install`).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from qdpo_core import gguf_files, registry
from qdpo_core.config import PipelineSpec, QuantSpec
from qdpo_core.errors import ModelUnavailable, SpecError
from qdpo_core.gguf_runtime import LlamaCpp, require_llama_cpp
from qdpo_core.models import load_full_precision, load_tokenizer, resolve_model_dir
from qdpo_core.quantize import load_quantized


@pytest.fixture(scope="module", autouse=True)
def _registry_as_it_was():
    """Models these tests register are gone afterwards (other tests' deployments share this process's registry)."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny model's directory with an F32 GGUF of it inside, registered as 'tiny-gguf'."""
    from gguf_fixtures import gguf_model_dir

    path = gguf_model_dir(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny")
    model = registry.register_model("tiny-gguf", str(path))
    assert model.problem is None, model.problem
    return path


def _prompt_ids(tokenizer, text: str, answer: str = "") -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return list(ids) + (tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else [])


# ---- the spec -----------------------------------------------------------------------------------


def test_spec_takes_the_gguf_types_the_gguf_package_quantizes():
    assert QuantSpec.from_dict({"method": "gguf", "type": "Q5_1"}).bits == 5
    assert QuantSpec.from_dict({"method": "gguf"}).bits is None  # the registered file's own types
    assert QuantSpec.from_dict(QuantSpec.from_dict({"method": "gguf", "type": "Q8_0"}).to_dict()).type == "Q8_0"
    for bad, param in (
        ({"method": "gguf", "type": "Q4_K_M"}, "quantization.type"),
        ({"method": "nf4", "type": "Q4_0"}, "quantization.type"),
        ({"method": "gguf", "type": "Q4_0", "bits": 3}, "quantization.bits"),
        ({"method": "gguf", "type": "Q4_0", "group_size": 32}, "quantization.group_size"),
    ):
        with pytest.raises(SpecError) as caught:
            QuantSpec.from_dict(bad)
        assert caught.value.param == param
    with pytest.raises(SpecError, match="llama-quantize"):
        QuantSpec.from_dict({"method": "gguf", "type": "Q4_K_M"})


def test_jobs_the_model_cannot_serve_are_refused_before_any_work(tiny_model_dir, tiny_gguf):
    registry.register_model("tiny", str(tiny_model_dir))
    with pytest.raises(SpecError) as caught:  # no GGUF to take llama.cpp's metadata from
        registry.check_quantization("tiny", QuantSpec(method="gguf", type="Q4_0"))
    assert caught.value.param == "quantization.method" and "QDPO_EXTRA_MODELS" in caught.value.message
    with pytest.raises(SpecError) as caught:  # the bundled FP weights *are* its GGUF: nothing to repair in that file
        registry.check_quantization("smollm2-135m-instruct", QuantSpec(method="gguf"))
    assert caught.value.param == "quantization.type"
    with pytest.raises(SpecError) as caught:
        registry.check_quantization("tiny-gguf", QuantSpec(method="gguf", type="Q4_0"), dtype="bfloat16")
    assert caught.value.param == "model.dtype"
    registry.check_quantization("tiny-gguf", QuantSpec(method="gguf"))
    registry.check_quantization("tiny-gguf", QuantSpec(method="gguf", type="Q4_0"))
    registry.check_quantization("tiny", QuantSpec(method="nf4"))
    # the same refusal when a job runs without the service (qdpo run): at the quantize stage, before any training
    with pytest.raises(SpecError) as caught:
        load_quantized(tiny_model_dir, QuantSpec(method="gguf", type="Q4_0"), "cpu")
    assert caught.value.param == "quantization.method"


# ---- registering a GGUF file: bad input -----------------------------------------------------------


def _registered_problem(name: str, path) -> str:
    model = registry.register_model(name, str(path))
    assert model.problem, f"{path.name} was accepted"
    with pytest.raises(SpecError) as caught:  # every job for it is refused, naming the model
        registry.check_quantization(name, QuantSpec(method="gguf"))
    assert caught.value.param == "model.name" and model.problem in caught.value.message
    with pytest.raises(ModelUnavailable):
        resolve_model_dir(name)
    assert str(path.parent) not in model.problem  # a client may read it: file names only
    return model.problem


def test_registration_refuses_files_that_are_not_the_fp_models_gguf(tiny_gguf, tmp_path):
    import shutil

    from gguf_fixtures import bundled_gguf

    directory = tmp_path / "tiny"
    shutil.copytree(tiny_gguf.parent, directory)
    not_gguf = directory / "notes.gguf"
    not_gguf.write_text("this is not a model")
    assert "is not a GGUF file" in _registered_problem("bad-magic", not_gguf)

    data = tiny_gguf.read_bytes()
    truncated = directory / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 4096])
    assert "truncated" in _registered_problem("bad-truncated", truncated)
    header_only = directory / "header.gguf"
    header_only.write_bytes(data[:200])
    assert "truncated or corrupt" in _registered_problem("bad-header", header_only)

    other = directory / "smollm2.gguf"  # a real llama GGUF, but of another network than this FP model
    other.symlink_to(bundled_gguf())
    problem = _registered_problem("bad-shapes", other)
    assert "not the same network" in problem and "token_embd.weight" in problem

    qwen = directory / "qwen.gguf"
    _rewrite_architecture(tiny_gguf, qwen, "qwen2")
    assert "architecture 'qwen2'" in _registered_problem("bad-arch", qwen)

    outside = tmp_path / "alone" / "model.gguf"  # no FP model beside it
    outside.parent.mkdir()
    outside.write_bytes(data)
    assert "Hugging Face directory" in _registered_problem("bad-place", outside)


def _rewrite_architecture(source, target, arch: str) -> None:
    """A copy of a GGUF file claiming another architecture (and renaming its llama.* keys to match)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value_type = field.types[0]
        writer.add_key_value(
            field.name.replace("llama.", f"{arch}.", 1),
            field.contents(),
            value_type,
            sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None,
        )
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file(path=target)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- the quantized student --------------------------------------------------------------------------


def test_permutation_is_the_one_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8 * 4, 6)  # 4 kv heads of 8 rows
    permuted = gguf_files.permute_rows(weights, 8, 4)
    assert not np.array_equal(permuted, weights)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, 8, 4), weights)
    assert np.array_equal(gguf_files.unpermute_rows(permuted, 8, 4), weights)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_1", "Q8_0"])
def test_the_student_computes_with_ggufs_dequantized_values(tiny_gguf, type_name):
    import gguf

    model_dir = resolve_model_dir("tiny-gguf")
    fp = load_full_precision(model_dir, "cpu")
    student, info = load_quantized(model_dir, QuantSpec(method="gguf", type=type_name), "cpu")
    qtype = gguf.GGMLQuantizationType[type_name]
    w = fp.model.layers[1].mlp.down_proj.weight.numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    assert np.array_equal(student.model.layers[1].mlp.down_proj.weight.numpy(), expected)
    assert not np.array_equal(expected, w)
    q8 = gguf.GGMLQuantizationType.Q8_0  # embeddings (and the tied output head): Q8_0, as llama-quantize stores the output tensor
    emb = fp.model.embed_tokens.weight.numpy()
    assert np.array_equal(student.model.embed_tokens.weight.numpy(), gguf.quants.dequantize(gguf.quants.quantize(emb, q8), q8))
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.model.layers[0].input_layernorm.weight, fp.model.layers[0].input_layernorm.weight)  # norms stay F32
    assert info.quantized_layers == 14 and info.gguf_types == {"F32": 5, type_name: 14, "Q8_0": 1} | ({"Q8_0": 15} if type_name == "Q8_0" else {})
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert info.packed_bytes < info.memory_bytes and info.bits == {"Q4_0": 4, "Q5_1": 5, "Q8_0": 8}[type_name]
    assert size / block * 8 > info.bits  # the packed size counts the per-block scales


def _lora_policy(student, seed: int = 0, rank: int = 4, alpha: int = 8):
    """The student with a random (non-zero) LoRA adapter, as training would leave it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    policy = get_peft_model(student, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy.eval()


def _export(policy, spec, target, model_dir):
    from qdpo_core.export import export_gguf

    (target / "adapter").mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(target / "adapter", save_embedding_layers=False)
    return export_gguf(spec, target, model_dir)


def test_written_files_read_back_through_transformers_and_gguf(tiny_gguf, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir("tiny-gguf")
    spec = PipelineSpec.from_dict({"model": {"name": "tiny-gguf"}, "quantization": {"method": "gguf", "type": "Q4_0"}})
    student, _ = load_quantized(model_dir, spec.quantization, "cpu")
    ours = {name: tensor.clone() for name, tensor in student.state_dict().items()}  # before peft wraps its layers
    entry = _export(_lora_policy(student), spec, tmp_path, model_dir)
    assert entry["base"]["file"] == "model-Q4_0.gguf" and entry["base"]["included"]
    assert entry["base"]["tensor_types"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1}
    assert entry["llama_cpp"] == "llama-cli -m model-Q4_0.gguf --lora adapter.gguf"

    # transformers' own GGUF loader (names, q/k order, de-quantization) gives back the student's weights, bit for bit
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model-Q4_0.gguf", dtype=torch.float32)
    theirs = loaded.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name

    # adapter.gguf: llama.cpp's LoRA layout (convert_lora_to_gguf.py): metadata, names, shapes, types
    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    base = {t.name: t for t in gguf.GGUFReader(tmp_path / "model-Q4_0.gguf").tensors}
    adapted = sorted(n for n in base if n.endswith(".weight") and base[n].shape.size == 2 and n != "token_embd.weight")
    names = sorted(t.name for t in reader.tensors)
    assert names == sorted([n + ".lora_a" for n in adapted] + [n + ".lora_b" for n in adapted])
    tensors = {t.name: t for t in reader.tensors}
    for name in adapted:
        a, b, w = tensors[name + ".lora_a"], tensors[name + ".lora_b"], base[name]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        # what llama.cpp's loader checks: model ne[0] == a ne[0], model ne[1] == b ne[1], a ne[1] == b ne[0] (the rank)
        assert (w.shape[0], w.shape[1], a.shape[1]) == (a.shape[0], b.shape[1], b.shape[0]) and a.shape[1] == 4


def test_llama_cpp_is_built_without_openmp():
    """torch brings its own libgomp.so.1; llama.cpp built with OpenMP crashed once inside llama_decode in
    the same process during the suite. `make install` builds it with ggml's own thread pool instead."""
    info = require_llama_cpp().llama_print_system_info().decode()
    assert "AVX" in info or "NEON" in info, info  # the line lists the CPU features it was built for
    assert "OPENMP = 1" not in info, f"llama-cpp-python was built with OpenMP; rebuild it with `rm .venv/.llama-cpp && make install` ({info})"


def test_llama_cpp_applies_the_adapter_as_torch_does(tiny_gguf, tmp_path):
    require_llama_cpp()  # fails (never skips) with the install command when llama-cpp-python is missing
    model_dir = resolve_model_dir("tiny-gguf")
    tokenizer = load_tokenizer(model_dir)
    ids = _prompt_ids(tokenizer, "Name three colours.", " Red, green and blue.")

    # An F32 base: llama.cpp's matrix products are plain float32, so base + adapter must match torch + PEFT to float noise.
    fp = load_full_precision(model_dir, "cpu")
    spec = PipelineSpec.from_dict({"model": {"name": "tiny-gguf"}, "quantization": {"method": "gguf", "type": "Q4_0"}})
    policy = _lora_policy(fp, seed=1)
    (tmp_path / "f32").mkdir()
    entry = _export(policy, spec, tmp_path / "f32", model_dir)
    with torch.no_grad():
        ours = policy(torch.tensor([ids])).logits[0].numpy()
        with policy.disable_adapter():
            base = policy(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(tiny_gguf, tmp_path / "f32" / "adapter.gguf") as llm:
        theirs = llm.logits(ids)
    effect = np.abs(ours - base).mean()
    assert effect > 0.05  # the adapter does something measurable
    assert np.abs(theirs - ours).max() < 1e-3  # measured ~2e-5: float32 summation order only

    # The Q4_0 base + the same kind of adapter: llama.cpp also rounds the activations to 8 bits inside its
    # quantized matrix products; the adapter must add no difference beyond that rounding's own.
    student, _ = load_quantized(model_dir, spec.quantization, "cpu")
    policy = _lora_policy(student, seed=2)
    entry = _export(policy, spec, tmp_path, model_dir)
    with torch.no_grad():
        ours = policy(torch.tensor([ids])).logits[0].numpy()
        with policy.disable_adapter():
            ours_base = policy(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(tmp_path / entry["base"]["file"]) as llm:
        theirs_base = llm.logits(ids)
    with LlamaCpp(tmp_path / entry["base"]["file"], tmp_path / "adapter.gguf") as llm:
        theirs = llm.logits(ids)
    floor = np.abs(theirs_base - ours_base).mean()
    assert np.abs(theirs - ours).mean() <= 1.5 * floor + 0.01
    delta_ours, delta_theirs = (ours - ours_base).ravel(), (theirs - theirs_base).ravel()
    cosine = float(delta_ours @ delta_theirs / np.linalg.norm(delta_ours) / np.linalg.norm(delta_theirs))
    assert cosine > 0.95 and np.abs(delta_ours).mean() > 5 * floor


def test_a_registered_file_from_llama_quantize_is_the_student_as_is(tiny_gguf, tmp_path):
    """Bring your own GGUF: a file llama.cpp quantized itself; the student is its de-quantized weights."""
    import shutil

    import gguf

    llama_cpp = require_llama_cpp()
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_gguf.parent, directory)
    target = directory / "model-Q5_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(directory / tiny_gguf.name).encode(), str(target).encode(), params) == 0
    model = registry.register_model("tiny-q5km", str(target))
    assert model.problem is None and model.quantizations["gguf"]["file"]["file_type"] == "Q5_K_M"
    model_dir = resolve_model_dir("tiny-q5km")
    student, info = load_quantized(model_dir, QuantSpec(method="gguf"), "cpu")
    tensors = {t.name: t for t in gguf.GGUFReader(target).tensors}
    down = tensors["blk.1.ffn_down.weight"]
    assert np.array_equal(student.model.layers[1].mlp.down_proj.weight.numpy(), gguf.quants.dequantize(down.data, down.tensor_type))
    q = tensors["blk.0.attn_q.weight"]  # stored in llama.cpp's row order: the student has it back in Hugging Face's
    config = json.loads((model_dir / "config.json").read_text())
    n_head = config["num_attention_heads"]
    expected = gguf_files.unpermute_rows(gguf.quants.dequantize(q.data, q.tensor_type), n_head, n_head)
    assert np.array_equal(student.model.layers[0].self_attn.q_proj.weight.numpy(), expected)
    assert info.packed_bytes == target.stat().st_size and math.isclose(
        info.bits, 8 * target.stat().st_size / sum(p.numel() for p in student.parameters()), abs_tol=0.01
    )

    tokenizer = load_tokenizer(model_dir)
    ids = _prompt_ids(tokenizer, "Say hello.")
    with torch.no_grad():
        ours = student(torch.tensor([ids])).logits[0].numpy()
    fp = load_full_precision(model_dir, "cpu")
    with torch.no_grad():
        fp_logits = fp(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(target) as llm:
        theirs = llm.logits(ids)
    # llama.cpp's numbers are the student's, within its activation rounding: far closer than to the FP model's
    assert np.abs(theirs - ours).mean() < 0.5 * np.abs(fp_logits - ours).mean()


def test_reading_a_gguf_header_rejects_a_wrong_magic_without_parsing(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(struct.pack("<4sI", b"GGML", 3))
    with pytest.raises(gguf_files.GGUFProblem, match="is not a GGUF file"):
        gguf_files.open_reader(path)
