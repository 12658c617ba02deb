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

# seccomp: syscalls that would let one process read another's memory (the harness's secret)
# or take its file descriptors; the kernel allows them between processes of one user.
_ARCH = {  # machine: (AUDIT_ARCH_*, ptrace, process_vm_readv, process_vm_writev, pidfd_getfd)
    "x86_64": (0xC000003E, 101, 310, 311, 438),
    "aarch64": (0xC00000B7, 117, 270, 271, 438),
}
_X32_SYSCALL_BIT = 0x40000000


class SetupError(Exception):
    """The sandbox could not be built (a syscall failed); the message names the step."""


def seccomp_filter(machine: str | None = None) -> bytes:
    """A BPF program denying the ptrace family with EPERM (and killing foreign-ABI calls);
    empty for a machine it has no syscall table for."""
    entry = _ARCH.get(machine or os.uname().machine)
    if entry is None:
        return b""
    arch, *denied = entry
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, 0x80000000), (ld, 0, 0, 0)]
    checks = [(jge, _X32_SYSCALL_BIT)] if arch == 0xC000003E else []
    checks += [(jeq, nr) for nr in denied]
    deny_at = len(prog) + len(checks) + 1
    prog += [(op, deny_at - (len(prog) + i) - 1, 0, k) for i, (op, k) in enumerate(checks)]
    prog += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | 1)]  # ALLOW; ERRNO(EPERM)
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


def main(spec: dict) -> None:
    if spec["mode"] == "bwrap":
        exec_bwrap(spec)
    else:
        run_unshared(spec)


# -- bubblewrap ------------------------------------------------------------------------
def exec_bwrap(spec: dict) -> None:
    apply_limits(spec)
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
                         (resource.RLIMIT_FSIZE, spec["file_size"]), (resource.RLIMIT_CORE, 0)):
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
