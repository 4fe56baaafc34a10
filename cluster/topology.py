"""Which logical CPUs a cluster's workers run on: one per physical core.

The physical cores come from `/sys/devices/system/cpu/cpu*/topology`: two logical CPUs
with the same (physical_package_id, core_id) are hyperthreads of one core, and we keep the
lowest-numbered of them. The count is checked against `psutil.cpu_count(logical=False)`
(a disagreement is logged, /sys wins); without /sys we fall back to psutil and the first
logical CPUs. CPUs this process may not run on (its affinity mask: a container's cpuset)
are left out.

Invariant: `assign_cores` gives each worker one CPU of the list, distinct unless the
caller asked to oversubscribe, in which case workers share CPUs round-robin.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

SYS_CPU_DIR = Path("/sys/devices/system/cpu")
_CPU_DIR_NAME = re.compile(r"^cpu(\d+)$")


class TopologyError(Exception):
    """The host's cores cannot be worked out, or cannot host the workers asked for."""


@dataclass(frozen=True)
class Topology:
    cpus: tuple[int, ...]
    """One logical CPU per physical core, ascending."""
    source: str
    """Where the cores came from: "sys" or "psutil"."""

    @property
    def cores(self) -> int:
        return len(self.cpus)


def read_sys_cores(sys_dir: Path = SYS_CPU_DIR) -> tuple[int, ...] | None:
    """The lowest logical CPU of each physical core, or None when `sys_dir` has no
    topology to read."""
    first_cpu: dict[tuple[int, int], int] = {}
    if not sys_dir.is_dir():
        return None
    for entry in sys_dir.iterdir():
        match = _CPU_DIR_NAME.match(entry.name)
        if match is None:
            continue
        cpu = int(match.group(1))
        core = _read_core(entry / "topology")
        if core is None:
            continue  # offline CPUs have no topology
        if core not in first_cpu or cpu < first_cpu[core]:
            first_cpu[core] = cpu
    if not first_cpu:
        return None
    return tuple(sorted(first_cpu.values()))


def _read_core(topology: Path) -> tuple[int, int] | None:
    try:
        package = int((topology / "physical_package_id").read_text().strip())
        core = int((topology / "core_id").read_text().strip())
    except (OSError, ValueError):
        return None
    return package, core


def detect(
    sys_dir: Path = SYS_CPU_DIR,
    *,
    psutil_cores: int | None = None,
    allowed: set[int] | None = None,
) -> Topology:
    """The host's physical cores. `psutil_cores` and `allowed` default to what psutil and
    the process's affinity say (tests pass them in)."""
    if psutil_cores is None:
        psutil_cores = psutil.cpu_count(logical=False)
    if allowed is None:
        allowed = set(os.sched_getaffinity(0))
    cpus = read_sys_cores(sys_dir)
    source = "sys"
    if cpus is None:
        if not psutil_cores:
            raise TopologyError(f"no CPU topology in {sys_dir} and psutil counts no cores")
        cpus = tuple(range(psutil_cores))
        source = "psutil"
    elif psutil_cores is not None and psutil_cores != len(cpus):
        logger.warning(
            "%s shows %d physical cores but psutil counts %d; using %s",
            sys_dir,
            len(cpus),
            psutil_cores,
            sys_dir,
        )
    usable = tuple(cpu for cpu in cpus if cpu in allowed)
    if not usable:
        # The affinity mask names none of the cores' first CPUs (hyperthread siblings
        # only, say): run on what we may run on rather than on nothing.
        usable = tuple(sorted(allowed))[: len(cpus)] or cpus
    return Topology(usable, source)


def assign_cores(workers: int, cpus: tuple[int, ...], *, oversubscribe: bool) -> list[int]:
    """The logical CPU for each of `workers` workers, in node order."""
    assert workers >= 1, workers
    assert cpus, "no CPUs to assign"
    if workers > len(cpus) and not oversubscribe:
        raise TopologyError(
            f"{workers} workers but only {len(cpus)} physical cores; "
            f"use --oversubscribe to share cores"
        )
    return [cpus[index % len(cpus)] for index in range(workers)]
