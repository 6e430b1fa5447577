"""A latency-bound mount for benchmarks (not a test): a copy of a directory behind a fixed delay per I/O request,
standing in for NFS and other network mounts where one stream is bound by round trips and parallel streams are
how the link is filled.

Two ways to build it, tried in this order (both need root):

- dm-delay: a sparse file under bench/.data on a loop device, the device-mapper `delay` target over it (every
  block request waits `delay_ms`), ext4 on that, the files copied in. Needs a kernel with device-mapper
  (/dev/mapper/control) and dmsetup, losetup, mkfs.ext4.
- FUSE: a read-only passthrough of the directory (this file run as `serve`, in its own process) that sleeps
  `delay_ms` before answering each read request. Needs /dev/fuse, libfuse2 (`apt-get install libfuse2`) and
  fusepy (`.venv/bin/pip install --target bench/.data/pydeps fusepy`; not a hotslot dependency). The kernel
  keeps the files in its page cache as NFS's client does, sends reads of at most 128 KiB (libfuse2's limit),
  and reads ahead in the background (`kernel_cache`: what is cached stays cached across opens); its cap on
  background requests (12 by default) is raised to `FUSE_MAX_BACKGROUND` so that it is the delay, not that cap,
  that bounds parallel streams.

`slow_mount(src, mountpoint, delay_ms)` is a context manager that builds one, yields a `SlowMount` (where the
files are, and what was built) and always tears it down; it raises `SlowMountUnavailable` with the reasons when
neither can be built. Drop the page cache between cold runs (`sync; echo 3 > /proc/sys/vm/drop_caches`).

    .venv/bin/python bench/slowdisk.py serve SRC MOUNTPOINT --delay-ms 2   # the FUSE server alone (foreground)
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PYDEPS = BENCH / ".data" / "pydeps"  # where bench-only packages (fusepy) are installed, outside the venv
# Background (read-ahead) requests the kernel keeps in flight on the FUSE mount; its default of 12 would cap 16
# parallel streams below what the delay allows. An NFS client's slot table is far larger.
FUSE_MAX_BACKGROUND = 64
FUSECTL = Path("/sys/fs/fuse/connections")
MOUNT_TIMEOUT_S = 20.0
# ext4 room beyond the copied files (metadata, journal) on the dm-delay device
DM_SLACK_BYTES = 512 * 1024**2


class SlowMountUnavailable(RuntimeError):
    """Neither dm-delay nor FUSE could be built here; the message says why for each."""


@dataclass
class SlowMount:
    root: Path  # the copy of `src`: the same relative paths
    kind: str  # "dm-delay" or "fuse"
    detail: str  # what was built, for the benchmark's header


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {(done.stderr or done.stdout).strip() or f'exit {done.returncode}'}")
    return done.stdout.strip()


def _quiet(*cmd: str) -> None:
    subprocess.run(cmd, capture_output=True)


@contextlib.contextmanager
def slow_mount(src: Path, mountpoint: Path, delay_ms: float, backend: str = "auto") -> Iterator[SlowMount]:
    """A latency-bound copy of `src` at `mountpoint` (`backend`: auto, dm or fuse), torn down on exit."""
    if os.geteuid() != 0:
        raise SlowMountUnavailable("needs root (loop devices, device-mapper, mount)")
    reasons = []
    for name, build in (("dm", _dm_delay), ("fuse", _fuse)):
        if backend not in ("auto", name):
            continue
        try:
            with build(src, mountpoint, delay_ms) as mount:
                yield mount
            return
        except _NotBuilt as err:
            reasons.append(f"{name}: {err}")
    raise SlowMountUnavailable("; ".join(reasons))


class _NotBuilt(Exception):
    """Raised only while building, before anything is yielded, so the next way can be tried."""


# -- dm-delay ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dm_delay(src: Path, mountpoint: Path, delay_ms: float) -> Iterator[SlowMount]:
    if not Path("/dev/mapper/control").exists():
        raise _NotBuilt("no /dev/mapper/control (this kernel has no device-mapper)")
    for tool in ("dmsetup", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise _NotBuilt(f"{tool} not found")
    files = [p for p in src.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files) * 11 // 10 + DM_SLACK_BYTES
    image = mountpoint.with_name(f"{mountpoint.name}.img")
    name = f"hotslot-slow-{os.getpid()}"
    loop = None
    mapped = mounted = False
    try:
        try:
            image.parent.mkdir(parents=True, exist_ok=True)
            with open(image, "wb") as f:
                f.truncate(size)  # sparse
            loop = _run("losetup", "--find", "--show", str(image))
            sectors = _run("blockdev", "--getsz", loop)
            _run("dmsetup", "create", name, "--table", f"0 {sectors} delay {loop} 0 {delay_ms:g}")
            mapped = True
            device = f"/dev/mapper/{name}"
            _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", device)
            mountpoint.mkdir(parents=True, exist_ok=True)
            _run("mount", "-o", "noatime", device, str(mountpoint))
            mounted = True
        except OSError as err:
            raise _NotBuilt(str(err)) from None
        for p in files:
            dest = mountpoint / p.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        _run("sync")
        yield SlowMount(mountpoint, "dm-delay",
                        f"dm-delay {delay_ms:g} ms per request over {loop} ({image.name}, sparse), ext4")
    finally:
        if mounted:
            _quiet("umount", str(mountpoint))
        if mapped:
            _quiet("dmsetup", "remove", name)
        if loop:
            _quiet("losetup", "--detach", loop)
        image.unlink(missing_ok=True)


# -- FUSE --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fuse(src: Path, mountpoint: Path, delay_ms: float) -> Iterator[SlowMount]:
    if not Path("/dev/fuse").exists():
        raise _NotBuilt("no /dev/fuse")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PYDEPS), os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import fuse"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise _NotBuilt(f"cannot import fusepy ({last}); apt-get install libfuse2 and "
                        f".venv/bin/pip install --target {PYDEPS.relative_to(BENCH.parent)} fusepy")
    if os.path.ismount(mountpoint):  # left over from a run that was killed
        _quiet("umount", "-l", str(mountpoint))
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.with_name(f"{mountpoint.name}.log")
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, __file__, "serve", str(src), str(mountpoint), "--delay-ms", f"{delay_ms:g}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    mounted_fusectl = False
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(mountpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise _NotBuilt(f"the FUSE server did not mount ({' / '.join(tail) or 'no output'})")
            time.sleep(0.05)
        if not os.path.ismount(FUSECTL):  # the fuse control file system, where max_background is set
            mounted_fusectl = subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)]).returncode == 0
        background = _raise_max_background(mountpoint)
        yield SlowMount(mountpoint, "fuse", f"FUSE passthrough (fusepy, libfuse2), {delay_ms:g} ms sleep per read "
                                            f"request, max_background {background}")
    finally:
        if os.path.ismount(mountpoint):
            _quiet("umount", str(mountpoint))
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if os.path.ismount(mountpoint):
            _quiet("umount", "-l", str(mountpoint))
        if mounted_fusectl:
            _quiet("umount", str(FUSECTL))


def _raise_max_background(mountpoint: Path) -> str:
    """Sets the mount's max_background (sysfs, root) to FUSE_MAX_BACKGROUND; returns the value in force."""
    dev = os.stat(mountpoint).st_dev  # the directory is named by the kernel's dev_t: major << 20 | minor
    conn = FUSECTL / str(os.major(dev) << 20 | os.minor(dev))
    try:
        (conn / "congestion_threshold").write_text(str(FUSE_MAX_BACKGROUND * 3 // 4))
        (conn / "max_background").write_text(str(FUSE_MAX_BACKGROUND))
        return (conn / "max_background").read_text().strip()
    except OSError:
        try:
            return (conn / "max_background").read_text().strip() + " (kernel default; sysfs not writable)"
        except OSError:
            return "unknown"


def read_only_passthrough(src: Path | str, on_read: Callable[[int], None]):
    """A fusepy Operations object serving `src` read-only; `on_read(nbytes)` runs after every read request (to
    delay it, count it), in that request's thread. Imports fusepy (see the module docstring)."""
    from fuse import FuseOSError, Operations

    class ReadOnlyPassthrough(Operations):
        use_ns = True

        def _path(self, path: str) -> str:
            return os.path.join(src, path.lstrip("/"))

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._path(path))
            except OSError as err:
                raise FuseOSError(err.errno) from None
            keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
            return {k.removesuffix("_ns"): getattr(st, k) for k in keys}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._path(path))]

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise FuseOSError(errno.EROFS)
            return os.open(self._path(path), os.O_RDONLY)

        def read(self, path, size, offset, fh):
            data = os.pread(fh, size, offset)
            on_read(len(data))
            return data

        def release(self, path, fh):
            os.close(fh)

        def statfs(self, path):
            st = os.statvfs(src)
            return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                               "f_files", "f_flag", "f_frsize", "f_namemax")}

    return ReadOnlyPassthrough()


def serve(src: Path, mountpoint: Path, delay_ms: float) -> None:
    """Runs the FUSE passthrough in the foreground until unmounted; one thread per request (libfuse2's mt loop),
    so concurrent requests sleep concurrently, as round trips on a network mount overlap."""
    from fuse import FUSE

    delay = delay_ms / 1000
    FUSE(read_only_passthrough(src, lambda _: time.sleep(delay)), str(mountpoint), foreground=True, nothreads=False,
         ro=True, fsname="hotslot-slowdisk", max_read=128 * 1024, kernel_cache=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the FUSE passthrough in the foreground")
    s.add_argument("src", type=Path)
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--delay-ms", type=float, default=2.0)
    args = parser.parse_args()
    serve(args.src.resolve(), args.mountpoint, args.delay_ms)


if __name__ == "__main__":
    main()
