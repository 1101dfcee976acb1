"""Facts about the device the engine runs on that kernels size their launches by."""
from __future__ import annotations

import torch

SM_COUNTS: dict[int, int] = {}  # CUDA device index -> multiprocessors (read once; tests may preset an H100's)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 for the CPU, where kernels run interpreted)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in SM_COUNTS:
        SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return SM_COUNTS[idx]
