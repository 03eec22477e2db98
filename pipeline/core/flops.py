"""Counted FLOPs of a training step: torch's FlopCounterMode over one forward and backward pass
(matrix multiplications, attention and convolutions; element-wise work is not counted, as in MFU)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def training_step_flops(forward: Callable[[], dict[str, torch.Tensor]], model: torch.nn.Module,
                        dtype: torch.dtype | None = None, device_type: str = "cpu") -> float:
    """FLOPs of `forward()["loss"].backward()`, under autocast to `dtype` when one is given. The
    gradients it leaves on `model` are cleared."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        forward()["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
