"""Peak memory for run summaries: CUDA max allocated per GPU, and the process's peak resident set."""

from __future__ import annotations

import sys

import torch

GIB = 1024**3


def cuda_devices(devices) -> list[torch.device]:
    out = []
    for device in devices:
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            if device not in out:
                out.append(device)
    return out


def reset_peaks(devices) -> None:
    for device in cuda_devices(devices):
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_bytes() -> int | None:
    """Largest resident set of this process so far, or None where the platform does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_report(devices) -> str:
    """e.g. ``cuda:0 21.4 GiB max allocated; CPU peak RSS 3.1 GiB``."""
    parts = [f"{d} {torch.cuda.max_memory_allocated(d) / GIB:.2f} GiB max allocated" for d in cuda_devices(devices)]
    rss = peak_rss_bytes()
    parts.append(f"CPU peak RSS {rss / GIB:.2f} GiB" if rss is not None else "CPU peak RSS unknown")
    return "; ".join(parts)
