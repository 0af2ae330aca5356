"""What this process may use: memory and CPUs, from its cgroup (v2 or v1), the CPU affinity mask
and the host's available memory. A container's limits live in its cgroup, not in /proc/meminfo
or os.cpu_count(): a pod limited to 8 GiB on a 256 GiB node sees the node's figures there.

Torch-free and reading files only, so it runs before anything heavy is loaded. Paths are
arguments so that tests read real-format files laid out in a tmp directory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this
# large is no limit on any machine.
_UNLIMITED_V1 = 1 << 62
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryLimit:
    """The tightest cgroup memory limit over this process's cgroup and its ancestors."""

    limit_bytes: int
    # The cgroup's usage less its inactive file cache: page cache the kernel reclaims before it
    # OOM-kills, counted as the kubelet counts a pod's working set. memory.current alone counts
    # torch's shared libraries read at import as used.
    used_bytes: int
    source: str  # the file the limit came from, e.g. "cgroup v2 memory.max"

    @property
    def available_bytes(self) -> int:
        return max(0, self.limit_bytes - self.used_bytes)

    def describe(self) -> str:
        return f"{self.source} {self.limit_bytes / GIB:.2f} GiB, {self.used_bytes / GIB:.2f} GiB in use"


@dataclass(frozen=True)
class CpuLimit:
    """CPUs this process may run on: its affinity mask and its cgroup's CPU quota."""

    affinity_cpus: int
    quota_cpus: float | None  # cpu.max (v2) or cfs_quota_us / cfs_period_us (v1); None: no quota
    source: str | None  # the file the quota came from

    @property
    def cpus(self) -> int:
        """Whole CPUs, at least 1: a thread beyond the quota is throttled, not run."""
        if self.quota_cpus is None:
            return self.affinity_cpus
        return max(1, min(self.affinity_cpus, math.floor(self.quota_cpus)))

    def describe(self) -> str:
        quota = "no quota" if self.quota_cpus is None else f"{self.source} {self.quota_cpus:g}"
        return f"{self.cpus} ({quota}; affinity mask {self.affinity_cpus})"


# ---- where the cgroup files are ---------------------------------------------------------------
def _cgroup_dirs(root: Path, self_cgroup: Path, controller: str) -> tuple[str, list[Path]]:
    """("v2" or "v1", the directories of this process's cgroup and of its ancestors that exist,
    innermost first) for `controller`; ("", []) without a cgroup filesystem.

    In a container the cgroup namespace (or a bind mount of the container's own cgroup, as runc
    does on v1) puts this process's cgroup at the mount's root, while /proc/self/cgroup may still
    name the host's path: directories that do not exist are skipped, the mount's root never is.
    """
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return "", []
    v1_path = v2_path = None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():
            v2_path = path
        elif controller in controllers.split(","):
            v1_path = path
    if v2_path is not None:
        return "v2", _ancestors(root, v2_path)
    if v1_path is not None:
        mount = root / controller
        if not mount.exists():  # mounted under the joint name, e.g. cpu,cpuacct
            mount = next((p for p in root.glob(f"*{controller}*") if controller in p.name.split(",")), mount)
        return "v1", _ancestors(mount, v1_path)
    return "", []


def _ancestors(mount: Path, path: str) -> list[Path]:
    parts = [p for p in path.split("/") if p]
    candidates = [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [d for d in candidates if d.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(path: Path, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


# ---- memory -------------------------------------------------------------------------------------
def memory_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> MemoryLimit | None:
    """The cgroup memory limit that leaves the least available, or None where none is set."""
    version, dirs = _cgroup_dirs(root, self_cgroup, "memory")
    if version == "v2":
        files = ("memory.max", "memory.current", "memory.stat", "inactive_file")
    elif version == "v1":
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")
    else:
        return None
    tightest = None
    for directory in dirs:
        limit_text = _read(directory / files[0])
        if limit_text is None or limit_text == "max" or int(limit_text) >= _UNLIMITED_V1:
            continue
        usage = int(_read(directory / files[1]) or 0)
        used = max(0, usage - _stat(directory / files[2], files[3]))
        found = MemoryLimit(int(limit_text), used, f"cgroup {version} {files[0]}")
        if tightest is None or found.available_bytes < tightest.available_bytes:
            tightest = found
    return tightest


def _meminfo_bytes(key: str, meminfo: Path) -> int | None:
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def host_available_bytes(meminfo: Path = MEMINFO) -> int:
    """The host's MemAvailable: free memory plus what the kernel can reclaim without swapping."""
    found = _meminfo_bytes("MemAvailable", meminfo)
    return found if found is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_total_bytes(meminfo: Path = MEMINFO) -> int:
    found = _meminfo_bytes("MemTotal", meminfo)
    return found if found is not None else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP, meminfo: Path = MEMINFO) -> int:
    """Memory this process can still take: the host's available memory, or its cgroup's, the smaller."""
    limit = memory_limit(root, self_cgroup)
    host = host_available_bytes(meminfo)
    return host if limit is None else min(host, limit.available_bytes)


def describe_memory() -> str:
    """Where available_memory_bytes comes from, for start-up messages."""
    limit = memory_limit()
    host = f"host MemAvailable {host_available_bytes() / GIB:.2f} GiB"
    return host if limit is None else f"{limit.describe()}; {host}"


# ---- CPUs ---------------------------------------------------------------------------------------
def cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP, affinity: int | None = None) -> CpuLimit:
    """The affinity mask's CPUs and the tightest CPU quota over this cgroup and its ancestors."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    version, dirs = _cgroup_dirs(root, self_cgroup, "cpu")
    quota, source = None, None
    for directory in dirs:
        if version == "v2":
            fields = (_read(directory / "cpu.max") or "max").split()
            if fields[0] == "max":
                continue
            cpus, name = int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000), "cpu.max"
        else:
            microseconds = int(_read(directory / "cpu.cfs_quota_us") or -1)
            if microseconds <= 0:
                continue
            cpus, name = microseconds / int(_read(directory / "cpu.cfs_period_us") or 100000), "cpu.cfs_quota_us"
        if quota is None or cpus < quota:
            quota, source = cpus, f"cgroup {version} {name}"
    return CpuLimit(affinity, quota, source)
