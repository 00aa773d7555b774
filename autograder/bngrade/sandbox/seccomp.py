"""The sandbox's seccomp denylist: system calls that a notebook never needs fail with EPERM.

Built with libseccomp (the ``libseccomp2`` system library, through the ``pyseccomp`` binding) and handed to
bwrap as compiled BPF (``--seccomp FD``). Everything else is allowed: Python, nbclient, zmq, numpy, torch,
``fork``, threads and sockets on the loopback keep working. A system call of another ABI (32-bit x86) kills
the process, so the list cannot be bypassed that way.
"""
import errno
import functools
import tempfile

#: denied outright: mounts and namespaces, tracing other processes, the kernel keyring, eBPF, perf events,
#: userfaultfd, kernel modules, kexec, reboot, swap, and io_uring (a large kernel surface no notebook uses)
DENIED = ("mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
          "fspick", "mount_setattr", "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev",
          "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "init_module",
          "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
          "io_uring_setup", "io_uring_enter", "io_uring_register")
#: clone(2) flags that make a namespace: such a clone fails with EPERM, a plain fork or thread does not
CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


def missing():
    """None when the filter can be built here, else why not (for the error message)."""
    try:
        bpf()
    except Exception as exc:  # ImportError without pyseccomp, RuntimeError without libseccomp
        return (f"cannot build the seccomp filter ({type(exc).__name__}: {exc}): install the pyseccomp package "
                "(requirements.txt) and the libseccomp2 system library")
    return None


@functools.cache
def bpf():
    """The compiled filter (classic BPF, as bwrap's ``--seccomp`` reads it)."""
    import pyseccomp as seccomp

    deny = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in DENIED:
        rules.add_rule(deny, name)
    for flag in CLONE_NAMESPACES:
        rules.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags are out of reach: libc falls back to clone
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()
