"""Physical cores from a /sys topology tree, and the CPU each worker is pinned to."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cluster.topology import TopologyError, assign_cores, detect, read_sys_cores


def fake_sys(root: Path, cpus: dict[int, tuple[int, int] | None]) -> Path:
    """A /sys/devices/system/cpu tree: cpu number -> (package, core), None = offline."""
    for cpu, place in cpus.items():
        directory = root / f"cpu{cpu}"
        directory.mkdir(parents=True)
        if place is None:
            continue
        topology = directory / "topology"
        topology.mkdir()
        (topology / "physical_package_id").write_text(f"{place[0]}\n")
        (topology / "core_id").write_text(f"{place[1]}\n")
    (root / "cpufreq").mkdir(parents=True, exist_ok=True)
    (root / "online").write_text("0-7\n")
    return root


def test_hyperthread_siblings_count_once_with_their_lowest_cpu(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert read_sys_cores(root) == (0, 1)


def test_the_same_core_id_on_two_packages_is_two_cores(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {0: (0, 0), 1: (1, 0), 2: (0, 0), 3: (1, 0)})
    assert read_sys_cores(root) == (0, 1)


def test_offline_cpus_and_other_entries_are_skipped(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {0: (0, 0), 1: None, 10: (0, 3)})
    assert read_sys_cores(root) == (0, 10)


def test_no_sys_tree_falls_back_to_psutil(tmp_path: Path) -> None:
    topology = detect(tmp_path / "missing", psutil_cores=3, allowed={0, 1, 2, 3})
    assert topology.cpus == (0, 1, 2)
    assert topology.source == "psutil"


def test_neither_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError):
        detect(tmp_path / "missing", psutil_cores=0, allowed={0})


def test_a_disagreement_with_psutil_is_logged_and_sys_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = fake_sys(tmp_path, {0: (0, 0), 1: (0, 1)})
    with caplog.at_level(logging.WARNING, logger="cluster.topology"):
        topology = detect(root, psutil_cores=4, allowed={0, 1})
    assert topology.cpus == (0, 1)
    assert topology.source == "sys"
    assert "psutil counts 4" in caplog.text


def test_cpus_outside_the_affinity_mask_are_left_out(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (0, 3)})
    assert detect(root, psutil_cores=4, allowed={1, 3}).cpus == (1, 3)


def test_the_host_has_at_least_one_core() -> None:
    topology = detect()
    assert topology.cores >= 1
    assert len(set(topology.cpus)) == topology.cores


def test_each_worker_gets_its_own_core() -> None:
    assert assign_cores(3, (0, 2, 4, 6), oversubscribe=False) == [0, 2, 4]


def test_more_workers_than_cores_is_refused_unless_oversubscribed() -> None:
    with pytest.raises(TopologyError, match="--oversubscribe"):
        assign_cores(3, (0, 1), oversubscribe=False)
    assert assign_cores(5, (0, 1), oversubscribe=True) == [0, 1, 0, 1, 0]
