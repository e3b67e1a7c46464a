"""curvlab on ``torch.distributed``: curvature over sharded data, and compressed communication.

Everything here runs on torch's own process groups (gloo on CPU, NCCL on GPUs); nothing is a
home-made transport.
"""

from __future__ import annotations

from curvlab.distributed.econtrol import EControlState, econtrol_hook
from curvlab.distributed.onebit_adam import OneBitAdam, onebit_adam
from curvlab.distributed.operator import DistributedOperator

__all__ = ["DistributedOperator", "EControlState", "OneBitAdam", "econtrol_hook", "onebit_adam"]
