"""run_pipeline: quantize → pairs → baseline eval → train → evaluate → export, resumable per stage.

    from qdpo_core.config import PipelineSpec
    from qdpo_core.pipeline import run_pipeline
    result = run_pipeline(PipelineSpec.from_dict({"method": "qdpo"}), "runs/demo", on_event=print)
    result.export_dir  # adapter/ + manifest.json + report.json + report.md

Work directory layout (every file is written atomically; a stage whose marker exists is skipped):

    spec.json                      the spec this directory belongs to (a different spec is refused)
    stages/<stage>.json            completion marker + stage summary (counts, timings)
    data/train.jsonl, data/eval.jsonl      normalised prompts / pairs after the split
    pairs.jsonl                    training records: messages, chosen, rejected (+ ids, scores)
    baseline/fp_responses.jsonl    FP greedy answers on held-out prompts (teacher for metrics)
    train/reference_logps.json     frozen-reference log-probs, computed once
    train/checkpoints/step-N/      adapter + optimizer + RNG + trainer_state.json (resume point)
    train/best/                    best adapter by held-out metric (or the identity adapter)
    evaluate/report.json           FP vs PTQ-only vs aligned, gap closed
    export/adapter/ manifest.json report.json report.md
"""
