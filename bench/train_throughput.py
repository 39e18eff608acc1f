"""DPO training throughput: the project's trainer vs TRL's DPOTrainer, same pairs, model, quantization, LoRA, batch.

    pip install trl                      # bench-only: `pip install -e '.[bench]'`
    python bench/train_throughput.py     # 32 built-in prompts, nf4, LoRA r16 all-linear, batch 4, 8 steps

Both run in float32 on the CPU with the reference log-probs precomputed (TRL:
precompute_ref_log_probs; ours always) and no gradient checkpointing, on the same token ids (TRL
tokenizes the pairs; our trainer is given TRL's tokenization). Pairs/s counts optimizer steps only
(the one-off reference pass is reported apart). Both first-step losses are printed: with the
policy equal to the reference they must agree (ln 2 for the sigmoid loss). The trainer's achieved
FLOP rate is compared with this machine's float32 matmul rate, measured in the same run.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from machine import describe, machine, settings_of  # noqa: E402


def matmul_gflops(seconds: float = 2.0) -> float:
    """float32 rate of a training-sized matmul (1024 tokens × 576 → 1536)."""
    import torch

    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    a @ b
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * 1024 * 576 * 1536 * runs / (time.perf_counter() - started) / 1e9


def step_flops(model, examples: list[dict], batch_size: int) -> float:
    """Forward + backward-to-inputs of the frozen base (4·N·T) plus the LM head on the answer window, per step."""
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n and "lora_" not in n)
    vocab_dim = model.get_output_embeddings().weight.numel()
    tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    answers = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    steps = -(-len(examples) // batch_size)
    return (4 * params * tokens + 4 * vocab_dim * answers) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(HERE / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from qdpo_core.config import QuantSpec, TrainSpec
    from qdpo_core.events import Emitter
    from qdpo_core.generate import Decoding, generate_all
    from qdpo_core.models import load_full_precision, load_tokenizer, resolve_model_dir
    from qdpo_core.prompts import builtin_prompts
    from qdpo_core.quantize import load_quantized
    from qdpo_core.tokens import encode_prompt
    from qdpo_core.train import Trainer, make_policy

    info = machine()
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    quant = QuantSpec(method="nf4")
    records = builtin_prompts("train")[: args.prompts]
    prompts = [encode_prompt(tokenizer, r["messages"], 512).ids for r in records]
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    teacher = load_full_precision(model_dir, "cpu")
    fp = generate_all(teacher, tokenizer, prompts, decoding, 8)
    del teacher
    student, _ = load_quantized(model_dir, quant, "cpu")
    q = generate_all(student, tokenizer, prompts, decoding, 8)
    rows = [
        {"prompt": r["messages"], "chosen": [{"role": "assistant", "content": a.text}], "rejected": [{"role": "assistant", "content": b.text}]}
        for r, a, b in zip(records, fp, q)
        if a.text != b.text
    ]
    print(f"{len(rows)} pairs from {len(records)} prompts (identical answers dropped)", flush=True)
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    learning_rate, steps = 1e-4, -(-len(rows) // args.batch_size)

    # ---- TRL ---------------------------------------------------------------------------------
    class StepClock(TrainerCallback):
        def __init__(self):
            self.begins, self.ends, self.losses = [], [], []

        def on_step_begin(self, *_args, **_kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, *_args, **_kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **_kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    trl_student, _ = load_quantized(model_dir, quant, "cpu")
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=steps,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            beta=0.1,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=args.batch_size,
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=True,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            max_length=None,
            dataloader_num_workers=0,
            seed=0,
        )
        trl = DPOTrainer(
            model=trl_student, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=LoraConfig(**lora), callbacks=[clock]
        )
        examples = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]} for e in trl.train_dataset]
        started = time.perf_counter()
        trl.train()
        trl_total = time.perf_counter() - started
    trl_train = clock.ends[-1] - clock.begins[0]
    trl_reference = trl_total - trl_train

    # ---- ours, on TRL's token ids ------------------------------------------------------------------
    def run_ours(compile_mode: str) -> dict:
        student, _ = load_quantized(model_dir, quant, "cpu")
        spec = TrainSpec(
            epochs=1,
            batch_size=args.batch_size,
            learning_rate=learning_rate,
            warmup_ratio=0,
            select_best=False,
            init="identity",
            lora_rank=16,
            compile=compile_mode,
        )
        policy = make_policy(student, spec, seed=0, base_model_name=args.model)
        times, losses = [], []

        def on_event(event):
            if event.type == "metrics":
                times.append(time.perf_counter())
                losses.append(event.data["loss"])
            elif event.type == "progress" and "reference" in event.message:
                times.clear()
                times.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(policy, None, tokenizer, examples, spec, "dpo", Path(out), None, {}, Emitter(on_event), seed=0)
            started = time.perf_counter()
            result = trainer.run()
            total = time.perf_counter() - started
        train = times[-1] - times[0]  # from the end of the reference pass to the last step
        row = {"policy": policy, "compiled": result.compiled, "reference_seconds": round(total - train, 1), "first_loss": losses[0], "losses": losses}
        if compile_mode == "on":  # the first step holds the compile: rate from the others, the compile shown apart
            later = times[-1] - times[1]
            row["seconds_per_step"] = round(later / (steps - 1), 2)
            row["first_step_seconds"] = round(times[1] - times[0], 1)
        else:
            row["seconds_per_step"] = round(train / steps, 2)
        row["pairs_per_second"] = round(args.batch_size / row["seconds_per_step"], 3) if compile_mode == "on" else round(len(examples) / train, 3)
        return row

    plain = run_ours("off")
    compiled = run_ours("on")
    policy = plain.pop("policy")
    compiled.pop("policy")

    rate = matmul_gflops()
    flops = step_flops(policy, examples, args.batch_size)
    result = {
        "pairs": len(examples),
        "steps": steps,
        "ours": {k: plain[k] for k in ("pairs_per_second", "seconds_per_step", "reference_seconds", "first_loss")},
        "ours_compiled": {k: compiled[k] for k in ("compiled", "pairs_per_second", "seconds_per_step", "first_step_seconds", "first_loss")},
        "trl": {
            "version": __import__("trl").__version__,
            "pairs_per_second": round(len(examples) / trl_train, 3),
            "seconds_per_step": round(trl_train / steps, 2),
            "reference_seconds": round(trl_reference, 1),
            "first_loss": clock.losses[0] if clock.losses else None,
        },
        "matmul_gflops": round(rate, 1),
        "trainer_gflops": round(flops / plain["seconds_per_step"] / 1e9, 1),
        "compiled_trainer_gflops": round(flops / compiled["seconds_per_step"] / 1e9, 1),
    }
    result["compiled_speedup"] = round(plain["seconds_per_step"] / compiled["seconds_per_step"], 2)
    result["compiled_loss_gap"] = max(abs(a - b) for a, b in zip(plain["losses"], compiled["losses"]))
    result["speedup"] = round(result["ours"]["pairs_per_second"] / result["trl"]["pairs_per_second"], 2)
    result["matmul_fraction"] = round(result["trainer_gflops"] / rate, 2)
    result["compiled_matmul_fraction"] = round(result["compiled_trainer_gflops"] / rate, 2)
    first_gap = abs(result["ours"]["first_loss"] - result["trl"]["first_loss"]) if result["trl"]["first_loss"] is not None else None
    table = "\n".join(
        [
            f"DPO training, {args.model} nf4 + LoRA r16 all-linear, {len(examples)} pairs, batch {args.batch_size}, {steps} steps, float32 ({describe(info)})",
            "",
            "| trainer | pairs/s | s/step | reference pass (s) | first-step loss |",
            "|---|---|---|---|---|",
            f"| qdpo | {result['ours']['pairs_per_second']} | {result['ours']['seconds_per_step']} | {result['ours']['reference_seconds']} | {result['ours']['first_loss']:.4f} |",
            f"| qdpo, `train.compile: on` (steps 2–{steps}; step 1 with the compile: {compiled['first_step_seconds']} s) | {compiled['pairs_per_second']} | "
            f"{compiled['seconds_per_step']} | {compiled['reference_seconds']} | {compiled['first_loss']:.4f} |",
            f"| TRL {result['trl']['version']} DPOTrainer | {result['trl']['pairs_per_second']} | {result['trl']['seconds_per_step']} | {result['trl']['reference_seconds']} | "
            + (f"{result['trl']['first_loss']:.4f} |" if result["trl"]["first_loss"] is not None else "– |"),
            "",
            f"qdpo is {result['speedup']}× TRL; first-step losses differ by {first_gap:.1e}."
            if first_gap is not None
            else f"qdpo is {result['speedup']}× TRL.",
            f"The trainer reaches {result['trainer_gflops']} GFLOP/s, {result['matmul_fraction']:.0%} of this machine's float32 matmul rate ({result['matmul_gflops']} GFLOP/s);"
            f" with compiled layers {result['compiled_trainer_gflops']} GFLOP/s, {result['compiled_matmul_fraction']:.0%} ({result['compiled_speedup']}× the plain step;"
            f" losses of every step within {result['compiled_loss_gap']:.1e} of the plain run's).",
        ]
    )
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings_of(args), "machine": info, "result": result}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}")
    torch.manual_seed(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
