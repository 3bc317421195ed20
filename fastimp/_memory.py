"""Free memory of a device, for sizing work to what fits."""
from __future__ import annotations

import torch


def available_bytes(device) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info``'s free bytes on a GPU; on the CPU
    the kernel's MemAvailable (8 GiB where /proc/meminfo is not there)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info.get("MemAvailable", 8 << 30))
    except OSError:  # pragma: no cover - not Linux
        return 8 << 30
