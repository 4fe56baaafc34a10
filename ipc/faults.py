"""Fault hooks: per-link drop rules and added delay, consulted by every transport.

Off unless switched on (by a chaos command in a real worker, or by the simulator). A
rule names a directed link (source -> target); a symmetric partition is two rules. Each
transport applies the rules at both ends it controls: it drops what it would send on a
blocked link and what it receives on one, so a partition holds even if only one side
was told. Delay holds outbound frames back without reordering a link.
"""

from __future__ import annotations

from collections.abc import Iterable

DELAY_NS_MAX = 60_000_000_000
"""No added delay is longer than a minute."""


class LinkFaults:
    def __init__(self) -> None:
        self._blocked: set[tuple[int, int]] = set()
        self._delay_ns: dict[tuple[int, int], int] = {}

    @property
    def active(self) -> bool:
        return bool(self._blocked or self._delay_ns)

    def block(self, source: int, target: int) -> None:
        assert source != target, source
        self._blocked.add((source, target))

    def unblock(self, source: int, target: int) -> None:
        self._blocked.discard((source, target))

    def partition(self, side: Iterable[int], other_side: Iterable[int]) -> None:
        """Cut every link between the two sides, both directions."""
        side, other_side = set(side), set(other_side)
        assert not side & other_side, (side, other_side)
        for a in sorted(side):
            for b in sorted(other_side):
                self.block(a, b)
                self.block(b, a)

    def set_delay(self, source: int, target: int, delay_ns: int) -> None:
        assert 0 <= delay_ns <= DELAY_NS_MAX, delay_ns
        if delay_ns:
            self._delay_ns[(source, target)] = delay_ns
        else:
            self._delay_ns.pop((source, target), None)

    def heal(self) -> None:
        """Remove every rule and every delay."""
        self._blocked.clear()
        self._delay_ns.clear()

    def blocks(self, source: int, target: int) -> bool:
        return (source, target) in self._blocked

    def delay_ns(self, source: int, target: int) -> int:
        return self._delay_ns.get((source, target), 0)

    def blocked_links(self) -> list[tuple[int, int]]:
        return sorted(self._blocked)
