"""Time for dcluster: physical clocks (system and simulated) and logical clocks.

Nothing outside clock/ reads time. Code that needs it takes a `Clock`: `SystemClock` in
production, a `SimClock` (driven by the simulator's `SimTime`) in simulation.
`HybridLogicalClock` stamps log entries, events and messages so timelines merged across
workers are ordered; `LamportClock` and `VectorClock` serve the history checkers.
"""

from clock._hlc import ClockOffsetError, HlcTimestamp, HybridLogicalClock
from clock._logical import LamportClock, Ordering, VectorClock
from clock._sim import SimClock, SimTime
from clock._system import Clock, SystemClock

__all__ = [
    "Clock",
    "ClockOffsetError",
    "HlcTimestamp",
    "HybridLogicalClock",
    "LamportClock",
    "Ordering",
    "SimClock",
    "SimTime",
    "SystemClock",
    "VectorClock",
]
