"""The encrypted host<->device channel (speculative pipelined encryption) and host-side stateless storage.

Lower layer: knows nothing of models, requests or the engine; callers name transfers with opaque keys.
"""
from ccserve.secure.channel import Channel, ChannelStats, PendingHost, Sealed
from ccserve.secure.cpu_crypto import WorkerPool
from ccserve.secure.errors import ChannelClosed, IntegrityError, OwnerEnded
from ccserve.secure.host_store import HostStore
from ccserve.secure.predictor import (
    Cycle,
    CyclicPredictor,
    FifoPredictor,
    Forget,
    Hint,
    Predictor,
    Schedule,
    SchedulePredictor,
    SwapOut,
)

__all__ = [
    "Channel", "ChannelClosed", "ChannelStats", "Cycle", "CyclicPredictor", "FifoPredictor", "Forget", "Hint",
    "HostStore", "IntegrityError", "OwnerEnded", "PendingHost", "Predictor", "Schedule", "SchedulePredictor", "Sealed", "SwapOut",
    "WorkerPool",
]
