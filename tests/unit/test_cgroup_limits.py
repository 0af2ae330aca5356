"""service.cgroup_limits against cgroup files laid out as the kernel writes them (v2, v1, the
hybrid layout, nested and namespaced cgroups), in a tmp directory."""

from __future__ import annotations

from pathlib import Path

from service import cgroup_limits
from service.cgroup_limits import GIB

MIB = 1 << 20
# What /proc/meminfo starts with (kB).
MEMINFO = "MemTotal:       24607636 kB\nMemFree:         1113048 kB\nMemAvailable:   16777216 kB\nBuffers: 1 kB\n"
V2_STAT = "anon 209715200\nfile 157286400\nkernel 8388608\nactive_file 52428800\ninactive_file {inactive}\nslab 4194304\n"
V1_STAT = ("cache 157286400\nrss 209715200\ninactive_file {inactive}\nactive_file 52428800\n"
           "hierarchical_memory_limit {limit}\ntotal_cache 157286400\ntotal_inactive_file {inactive}\n")
V1_UNLIMITED = "9223372036854771712"


def write(base: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text + "\n")


def v2(tmp_path: Path, self_cgroup: str, cgroups: dict[str, dict[str, str]]) -> tuple[Path, Path]:
    """A cgroup2 mount in tmp_path/fs (cgroup.controllers at its root) and a /proc/self/cgroup."""
    root = tmp_path / "fs"
    write(root, {"cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc"})
    for path, files in cgroups.items():
        write(root / path.strip("/"), files)
    write(tmp_path, {"self_cgroup": f"0::{self_cgroup}"})
    return root, tmp_path / "self_cgroup"


def test_v2_container_limits_at_the_namespace_root(tmp_path):
    root, self_cgroup = v2(tmp_path, "/", {"/": {
        "memory.max": str(GIB), "memory.current": str(300 * MIB), "memory.stat": V2_STAT.format(inactive=100 * MIB),
        "cpu.max": "200000 100000"}})
    limit = cgroup_limits.memory_limit(root, self_cgroup)
    # The inactive file cache is reclaimed before an OOM kill: not counted as used.
    assert (limit.limit_bytes, limit.used_bytes, limit.available_bytes) == (GIB, 200 * MIB, GIB - 200 * MIB)
    assert limit.source == "cgroup v2 memory.max"
    cpus = cgroup_limits.cpu_limit(root, self_cgroup, affinity=64)
    assert (cpus.cpus, cpus.quota_cpus, cpus.source) == (2, 2.0, "cgroup v2 cpu.max")
    write(tmp_path, {"meminfo": MEMINFO})
    assert cgroup_limits.available_memory_bytes(root, self_cgroup, tmp_path / "meminfo") == GIB - 200 * MIB


def test_v2_the_tightest_ancestor_wins_and_max_is_no_limit(tmp_path):
    root, self_cgroup = v2(tmp_path, "/kubepods.slice/pod1/ctr", {
        "/kubepods.slice": {"memory.max": str(8 * GIB), "memory.current": str(GIB), "memory.stat": V2_STAT.format(inactive=0),
                            "cpu.max": "max 100000"},
        "/kubepods.slice/pod1": {"memory.max": str(512 * MIB), "memory.current": str(128 * MIB),
                                 "memory.stat": V2_STAT.format(inactive=0), "cpu.max": "150000 100000"},
        "/kubepods.slice/pod1/ctr": {"memory.max": "max", "memory.current": str(100 * MIB),
                                     "memory.stat": V2_STAT.format(inactive=0), "cpu.max": "max 100000"},
    })
    limit = cgroup_limits.memory_limit(root, self_cgroup)
    assert (limit.limit_bytes, limit.available_bytes) == (512 * MIB, 384 * MIB)
    cpus = cgroup_limits.cpu_limit(root, self_cgroup, affinity=64)
    assert (cpus.quota_cpus, cpus.cpus) == (1.5, 1)  # a thread past the quota would be throttled


def test_v2_without_a_cgroup_namespace_reads_the_mount_root(tmp_path):
    """/proc/self/cgroup names the host's path, which the container's mount does not have."""
    root, self_cgroup = v2(tmp_path, "/machine.slice/libpod-0123abcd.scope", {"/": {
        "memory.max": str(2 * GIB), "memory.current": str(GIB), "memory.stat": V2_STAT.format(inactive=0),
        "cpu.max": "50000 100000"}})
    assert cgroup_limits.memory_limit(root, self_cgroup).available_bytes == GIB
    assert cgroup_limits.cpu_limit(root, self_cgroup, affinity=8).cpus == 1  # half a CPU: one thread


def test_no_limit_anywhere(tmp_path):
    root, self_cgroup = v2(tmp_path, "/", {"/": {"memory.max": "max", "memory.current": str(GIB),
                                                 "cpu.max": "max 100000"}})
    assert cgroup_limits.memory_limit(root, self_cgroup) is None
    cpus = cgroup_limits.cpu_limit(root, self_cgroup, affinity=12)
    assert (cpus.cpus, cpus.quota_cpus) == (12, None)
    write(tmp_path, {"meminfo": MEMINFO})
    assert cgroup_limits.available_memory_bytes(root, self_cgroup, tmp_path / "meminfo") == 16 * GIB
    # No cgroup filesystem at all (another OS, a sandbox): the host's figures.
    assert cgroup_limits.memory_limit(tmp_path / "none", tmp_path / "none") is None
    assert cgroup_limits.cpu_limit(tmp_path / "none", tmp_path / "none", affinity=3).cpus == 3


def test_the_affinity_mask_caps_the_quota(tmp_path):
    root, self_cgroup = v2(tmp_path, "/", {"/": {"cpu.max": "800000 100000"}})
    assert cgroup_limits.cpu_limit(root, self_cgroup, affinity=2).cpus == 2


def test_a_host_tighter_than_the_cgroup_wins(tmp_path):
    root, self_cgroup = v2(tmp_path, "/", {"/": {"memory.max": str(64 * GIB), "memory.current": "0",
                                                 "memory.stat": V2_STAT.format(inactive=0)}})
    write(tmp_path, {"meminfo": MEMINFO})
    assert cgroup_limits.available_memory_bytes(root, self_cgroup, tmp_path / "meminfo") == 16 * GIB


def v1(tmp_path: Path, path: str, memory: dict[str, str], cpu: dict[str, str], hybrid: bool) -> tuple[Path, Path]:
    """cgroup v1: a mount per controller (cpu and cpuacct joined, as systemd mounts them)."""
    root = tmp_path / "fs"
    write(root / "memory" / path.strip("/"), memory)
    write(root / "cpu,cpuacct" / path.strip("/"), cpu)
    lines = [f"12:memory:{path}", f"4:cpu,cpuacct:{path}", "1:name=systemd:/init.scope"]
    if hybrid:  # systemd's hybrid layout: a cgroup2 mount beside, with no controllers
        (root / "unified").mkdir()
        lines.append("0::/init.scope")
    write(tmp_path, {"self_cgroup": "\n".join(lines)})
    return root, tmp_path / "self_cgroup"


def test_v1_limits_of_a_docker_container(tmp_path):
    root, self_cgroup = v1(tmp_path, "/docker/0123abcd",
                           {"memory.limit_in_bytes": str(GIB), "memory.usage_in_bytes": str(600 * MIB),
                            "memory.stat": V1_STAT.format(inactive=200 * MIB, limit=GIB)},
                           {"cpu.cfs_quota_us": "300000", "cpu.cfs_period_us": "100000"}, hybrid=True)
    limit = cgroup_limits.memory_limit(root, self_cgroup)
    assert (limit.limit_bytes, limit.used_bytes) == (GIB, 400 * MIB)
    assert limit.source == "cgroup v1 memory.limit_in_bytes"
    cpus = cgroup_limits.cpu_limit(root, self_cgroup, affinity=64)
    assert (cpus.cpus, cpus.source) == (3, "cgroup v1 cpu.cfs_quota_us")


def test_v1_unlimited_is_no_limit(tmp_path):
    root, self_cgroup = v1(tmp_path, "/", {"memory.limit_in_bytes": V1_UNLIMITED, "memory.usage_in_bytes": str(GIB)},
                           {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}, hybrid=False)
    assert cgroup_limits.memory_limit(root, self_cgroup) is None
    assert cgroup_limits.cpu_limit(root, self_cgroup, affinity=4).quota_cpus is None


def test_this_machine_reads_without_error():
    """The real files: whatever they say, they parse, and the figures are positive."""
    limit = cgroup_limits.memory_limit()
    assert limit is None or limit.limit_bytes > 0
    assert cgroup_limits.cpu_limit().cpus >= 1
    assert 0 < cgroup_limits.available_memory_bytes() <= cgroup_limits.host_total_bytes()
