"""qdpo_core: quantize → build preference pairs → DPO-train LoRA → evaluate → export.

The package root imports nothing heavy; torch is loaded by the modules that need it.
Entry point: `qdpo_core.pipeline.run_pipeline(spec, workdir, on_event)`.
"""

__version__ = "0.1.0"
