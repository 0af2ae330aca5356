"""The CPU: no streams, nothing to wait for; outputs are already host memory."""

from __future__ import annotations

import numpy as np
import torch

from service.platforms.base import HostStaging, Platform


class CpuPlatform(Platform):
    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = self.tensor_device = device  # `meta` too (tests move models there as to a GPU)

    def to_host(self, tensors: list[torch.Tensor], staging: HostStaging, stream=None) -> list[np.ndarray]:
        return [tensor.float().numpy() for tensor in tensors]
