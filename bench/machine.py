"""What a benchmark ran on: CPU model and flags, cores, torch threads, load while it ran.

Every bench script records this beside its numbers: a figure without its machine means nothing
(bfloat16 is several times faster than float32 on some CPUs and tens of times slower on others).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni", "fma", "f16c")


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    return {"model": model, "cores": os.cpu_count(), "flags": sorted(f for f in flags if f in INTERESTING_FLAGS)}


def machine() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_info()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def describe(info: dict) -> str:
    cpu = info["cpu"]
    load = info.get("load_average_at_start")
    return f"{cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '–'}" + (f"; load average at start {load[0]}" if load else "")


def settings_of(args) -> dict:
    """A bench's command-line settings for its JSON, without the paths of this checkout (where it wrote, where it ran)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "runs_dir")}
