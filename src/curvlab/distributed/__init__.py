"""curvlab on ``torch.distributed``: curvature over sharded data, curvature optimizers under DDP,
and compressed communication.

Everything here runs on torch's own process groups (gloo on CPU, NCCL on GPUs); nothing is a
home-made transport.
"""

from __future__ import annotations

from curvlab.distributed.data_parallel import DataParallelCurvature
from curvlab.distributed.econtrol import EControlState, econtrol_hook
from curvlab.distributed.onebit_adam import OneBitAdam, onebit_adam
from curvlab.distributed.operator import DistributedOperator

__all__ = [
    "DataParallelCurvature",
    "DistributedOperator",
    "EControlState",
    "OneBitAdam",
    "econtrol_hook",
    "onebit_adam",
]
