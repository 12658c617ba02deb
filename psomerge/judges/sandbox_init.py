"""The code sandbox's launcher: a trusted program (standard library only) that the scorer
starts with its own interpreter, ``python -I -S -B sandbox_init.py SPEC_JSON``.

It sets the limits, drops root to the run's own user id (``SPEC.uid``), installs a seccomp filter, and starts the
untrusted interpreter in fresh namespaces, one of two ways (``SPEC.mode``):

- ``bwrap``: exec bubblewrap, which builds the namespaces and the file system view;
- ``unshare`` (root only): unshare the mount, PID, network, IPC, UTS and cgroup namespaces
  itself, fork the sandbox's PID 1, build the same view with mount syscalls, exec.

Either way the program sees the host's files read-only, an empty ``/proc`` and ``/dev/shm``,
and one writable place, ``/tmp`` (its working directory): a private tmpfs of ``SPEC.disk``
bytes, its whole disk quota. When PID 1 (the harness) exits, the kernel kills every process
left in the PID namespace, so nothing a program starts outlives its run. stdin (the job), the
result pipe (``SPEC.result_fd``) and stderr pass through to the harness untouched.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD, SYS_MOUNT_SETATTR = 0x1, 0x2, 0x8000, -100, 442
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 1, 22, 38, 2
SETUP_FAILED = 125

# seccomp: what no program needs and a sandbox must not allow (the kernel allows each of these
# to an unprivileged process):
# - reading another process's memory or taking its file descriptors (the harness's secret):
#   ptrace, process_vm_readv/writev, pidfd_getfd;
# - leaving the network namespace: sockets of every family but IP and netlink (both private
#   to the namespace): a Unix socket reaches any host service whose socket file is visible,
#   however read-only the mount, and vsock reaches the hypervisor's host; io_uring, whose
#   operations (socket, connect) no seccomp filter sees;
# - storage outside the size-limited /tmp: memfd_create, SysV shared memory;
# - new namespaces and mounts (a private tmpfs of any size, a fresh view of the host):
#   unshare, setns, clone with namespace flags, clone3 (its flags are out of the filter's
#   reach: ENOSYS, so the C library falls back to clone), the mount family;
# - kernel interfaces a program has no use for: keyrings, bpf, perf events, userfaultfd.
_SYSCALLS = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "io_uring_setup", "io_uring_enter",
             "io_uring_register", "memfd_create", "shmget", "unshare", "setns", "mount", "umount2", "pivot_root",
             "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "keyctl",
             "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd")
_ARCH = {  # machine: (AUDIT_ARCH_*, {syscall: number})
    "x86_64": (0xC000003E, dict(zip(_SYSCALLS + ("socket", "clone", "clone3"), (
        101, 310, 311, 438, 425, 426, 427, 319, 29, 272, 308, 165, 166, 155, 428, 429, 430, 431, 432, 433, 442, 250,
        248, 249, 321, 298, 323, 41, 56, 435)))),
    "aarch64": (0xC00000B7, dict(zip(_SYSCALLS + ("socket", "clone", "clone3"), (
        117, 270, 271, 438, 425, 426, 427, 279, 194, 97, 268, 40, 39, 41, 428, 429, 430, 431, 432, 433, 442, 219,
        217, 218, 280, 241, 282, 198, 220, 435)))),
}
_X32_SYSCALL_BIT = 0x40000000
SOCKET_FAMILIES = (2, 10, 16)  # AF_INET, AF_INET6, AF_NETLINK
CLONE_NEW_FLAGS = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_EPERM, _ENOSYS = 1, 38


class SetupError(Exception):
    """The sandbox could not be built (a syscall failed); the message names the step."""


def seccomp_filter(machine: str | None = None) -> bytes:
    """The BPF program of the sandbox's seccomp filter (see above): EPERM for the denied
    calls, socket families and clone flags, ENOSYS for clone3, death for a foreign ABI; empty
    for a machine it has no syscall table for."""
    entry = _ARCH.get(machine or os.uname().machine)
    if entry is None:
        return b""
    arch, nr = entry
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050000 | _EPERM, 0x00050000 | _ENOSYS, 0x80000000
    # (opcode, k, label to jump to when true, label when false; None: the next instruction);
    # "name:" marks where label "name" points. Offsets 16 and 4: args[0] (low half) and arch.
    prog: list = [(ld, 4), (jeq, arch, None, "kill"), (ld, 0)]
    if arch == 0xC000003E:
        prog.append((jge, _X32_SYSCALL_BIT, "eperm"))
    prog += [(jeq, nr[name], "eperm") for name in _SYSCALLS]
    prog += [(jeq, nr["clone3"], "enosys"), (jeq, nr["socket"], "socket"), (jeq, nr["clone"], "clone"), (ret, allow),
             "socket:", (ld, 16), *((jeq, family, "allow") for family in SOCKET_FAMILIES), (ret, eperm),
             "clone:", (ld, 16), (jset, CLONE_NEW_FLAGS, "eperm"), (ret, allow),
             "allow:", (ret, allow), "eperm:", (ret, eperm), "enosys:", (ret, enosys), "kill:", (ret, kill)]
    where: dict[str, int] = {}
    code = []
    for insn in prog:
        if isinstance(insn, str):
            where[insn.rstrip(":")] = len(code)
        else:
            code.append((*insn, None, None)[:4])

    def offset(i: int, label: str | None) -> int:
        return 0 if label is None else where[label] - i - 1  # forward jumps, at most 255: a short program

    return b"".join(struct.pack("HBBI", op, offset(i, jt), offset(i, jf), k) for i, (op, k, jt, jf) in enumerate(code))


def main(spec: dict) -> None:
    if spec["mode"] == "bwrap":
        exec_bwrap(spec)
    else:
        run_unshared(spec)


# -- bubblewrap ------------------------------------------------------------------------
def exec_bwrap(spec: dict) -> None:
    apply_limits(spec)
    die_with_scorer(ctypes.CDLL(None, use_errno=True), spec)  # after the user id changed: that clears it
    args = [spec["bwrap"], "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--ro-bind", "/", "/", "--dev", "/dev", "--remount-ro", "/dev", "--tmpfs", "/proc",
            "--remount-ro", "/proc", "--size", str(spec["disk"]), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    bpf = seccomp_filter()
    if bpf:
        r, w = os.pipe()
        os.write(w, bpf)
        os.close(w)
        os.set_inheritable(r, True)
        args += ["--seccomp", str(r)]
    os.execve(spec["bwrap"], [*args, "--", *spec["argv"]], spec["env"])


# -- namespaces by hand (root) ---------------------------------------------------------
def run_unshared(spec: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    die_with_scorer(libc, spec)
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    _check(libc.unshare(flags), "unshare(mount, pid, net, ipc, uts, cgroup namespaces)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    alive_r, alive_w = os.pipe()  # the child sees EOF here once this process is gone
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespace
        os.close(alive_w)
        try:
            enter_sandbox(spec, libc, alive_r)
        except BaseException as exc:  # noqa: BLE001 - report any setup failure, never run unconfined
            os.write(2, f"sandbox: {exc}\n".encode())
        os._exit(SETUP_FAILED)
    os.close(alive_r)
    _, status = os.waitpid(pid, 0)  # returns once every process of the namespace is gone
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)


def enter_sandbox(spec: dict, libc, alive_r: int) -> None:
    read_only_root(libc)
    _mount(libc, b"tmpfs", b"/proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=555")
    if os.path.isdir("/dev/shm"):
        _mount(libc, b"tmpfs", b"/dev/shm", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=555")
    _mount(libc, b"tmpfs", b"/tmp", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={spec['disk']},mode=1777".encode())
    os.chdir("/tmp")
    apply_limits(spec)
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    os.set_blocking(alive_r, False)
    try:
        if os.read(alive_r, 1) == b"":
            raise SetupError("the launcher exited before the sandbox started")
    except BlockingIOError:
        pass  # the launcher is alive
    os.close(alive_r)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    bpf = seccomp_filter()
    if bpf:
        buf = ctypes.create_string_buffer(bpf, len(bpf))
        prog = struct.pack("HxxxxxxQ", len(bpf) // 8, ctypes.addressof(buf))  # struct sock_fprog
        _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(prog), 0, 0), "seccomp filter")
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def die_with_scorer(libc, spec: dict) -> None:
    """SIGKILL this process when the scorer that started it dies (a ``kill -9`` of psomerge):
    the sandbox, which dies with this process, never outlives its scorer."""
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != spec["scorer"]:
        raise SetupError("the scorer exited before the sandbox started")


def read_only_root(libc) -> None:
    """Every mount of this namespace read-only and nosuid (Linux >= 5.12: mount_setattr)."""
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(b"/"),
                      ctypes.c_uint(AT_RECURSIVE), ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)))
    _check(rc, "mount_setattr(/, read-only, recursive) (needs Linux >= 5.12)")


def apply_limits(spec: dict) -> None:
    """rlimits, then root dropped to ``spec.uid`` (the process count binds non-root users only)."""
    for limit, value in ((resource.RLIMIT_CPU, spec["cpu"]), (resource.RLIMIT_AS, spec["address_space"]),
                         (resource.RLIMIT_FSIZE, spec["file_size"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, spec["open_files"])):
        resource.setrlimit(limit, (value, value))
    if spec["uid"] is not None:
        os.setgroups([])
        os.setresgid(spec["uid"], spec["uid"], spec["uid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["processes"], spec["processes"]))


def _mount(libc, fstype: bytes, target: bytes, flags: int, data: bytes) -> None:
    _check(libc.mount(fstype, target, fstype, flags, data), f"mount {fstype.decode()} on {target.decode()}")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what} failed: {os.strerror(err)} (errno {err})")


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except (SetupError, OSError) as exc:
        os.write(2, f"sandbox: {exc}\n".encode())
        sys.exit(SETUP_FAILED)
