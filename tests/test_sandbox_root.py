"""The sandbox's own defences, tried by small hostile programs (not notebooks: each run takes about a second).

Each program runs as the sandboxed module (``module=``) and reports what it managed to do. As root, the grader
drops to an unprivileged uid; the same checks run with the grader itself as a normal user. Each defence is
also shown to matter: with the seccomp denylist replaced by an empty one, the calls that it stops succeed.
"""
import errno
import importlib
import json
import os
import platform
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bngrade import sandbox
from bngrade.sandbox import seccomp

box = importlib.import_module("bngrade.sandbox.bwrap")   # the package's ``bwrap`` is the function of that name

pytestmark = pytest.mark.skipif(sandbox.available() is not None, reason=f"no sandbox here: {sandbox.available()}")
ROOT = os.geteuid() == 0
LIMITS = sandbox.Limits(memory=2 * sandbox.GiB, processes=1024, wall=120)

# Each attack prints "ok" when it worked, else the errno's name. Nothing is changed even when one works: the
# sysctls are only opened for writing (core_pattern gets its own value back), keys and perf events are ours.
HOSTILE = r'''
import ctypes, errno, json, os, struct, subprocess

libc = ctypes.CDLL(None, use_errno=True)
NR = {"keyctl": 250, "add_key": 248, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323}


def result(value):
    return "ok" if value >= 0 else errno.errorcode[ctypes.get_errno()]


def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]


def writable(root):
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                os.close(os.open(os.path.join(folder, name), os.O_WRONLY))
                found.append(os.path.join(folder, name))
            except OSError:
                pass
    return found


def core_pattern():
    value = open("/proc/sys/kernel/core_pattern").read()
    with open("/proc/sys/kernel/core_pattern", "w") as fh:
        fh.write(value)


def traced_child():
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.ptrace(0, 0, None, None) == 0 else ctypes.get_errno())   # PTRACE_TRACEME
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return "ok" if code == 0 else errno.errorcode[code]


def clone_newuser():
    pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)   # clone(CLONE_NEWUSER | SIGCHLD)
    if pid == 0:
        os._exit(0)
    if pid < 0:
        return errno.errorcode[ctypes.get_errno()]
    os.waitpid(pid, 0)
    return "ok"


def process_vm_readv():
    data, copy = ctypes.create_string_buffer(b"x" * 8), ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(copy), 8)
    remote = (ctypes.c_void_p * 2)(ctypes.addressof(data), 8)
    return result(libc.process_vm_readv(os.getpid(), local, 1, remote, 1, 0))


def perf_event_open():   # a software clock of this process, user space only
    attr = struct.pack("IIQQQQQ", 1, 64, 0, 0, 0, 0, 1 | 1 << 5 | 1 << 6).ljust(64, b"\0")
    return result(libc.syscall(NR["perf_event_open"], attr, 0, -1, -1, 0))


mounts = {line.split()[4]: line.split()[5] for line in open("/proc/self/mountinfo")}
report = {
    "uid": os.getuid(), "gid": os.getgid(),
    "root_only_file": attempt(lambda: open(os.environ["SECRET"]).read()) if "SECRET" in os.environ else None,
    "core_pattern": attempt(core_pattern),
    "writable": writable("/proc/sys") + writable("/proc/bus") + writable("/proc/fs") + writable("/proc/irq"),
    "mount_options": {p: mounts.get(p) for p in ("/proc/sys", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/acpi")},
    "keys_readable": attempt(lambda: open("/proc/keys").read()),
    "timer_list_readable": attempt(lambda: open("/proc/timer_list").read()),
    "unshare_user": result(libc.unshare(0x10000000)),
    "unshare_command": subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode,
    "clone_newuser": clone_newuser(),
    "mount": result(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "ptrace": traced_child(),
    "process_vm_readv": process_vm_readv(),
    "keyctl": result(libc.syscall(NR["keyctl"], 0, -4, 1)),   # KEYCTL_GET_KEYRING_ID of the user keyring
    "add_key": result(libc.syscall(NR["add_key"], b"user", b"bngrade", b"x", 1, -2)),
    "bpf": result(libc.syscall(NR["bpf"], 0, bytes(64), 64)),
    "perf_event_open": perf_event_open(),
    "userfaultfd": result(libc.syscall(NR["userfaultfd"], 1)),   # UFFD_USER_MODE_ONLY
}
print(json.dumps(report))
'''

# What a notebook needs keeps working: numpy, fork, threads, multiprocessing, subprocesses, sockets on the
# loopback, torch.distributed's gloo.
HONEST = r'''
import json, multiprocessing, os, socket, subprocess, threading

import numpy as np


def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def loopback():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    client.sendall(b"ping")
    return conn.recv(4).decode()


def thread():
    box = []
    worker = threading.Thread(target=lambda: box.append(sum(range(10))))
    worker.start()
    worker.join()
    return box[0]


def gloo():
    import torch
    import torch.distributed as dist

    port = socket.create_server(("127.0.0.1", 0)).getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    value = torch.ones(3)
    dist.all_reduce(value)
    dist.destroy_process_group()
    return value.tolist()


if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2) as pool:
        squares = pool.map(abs, [-1, -2, -3])
    report = {"numpy": float(np.ones((3, 3)).sum()), "fork": fork(), "thread": thread(), "pool": squares,
              "subprocess": subprocess.run(["true"]).returncode, "loopback": loopback(), "gloo": gloo()}
    print(json.dumps(report))
'''

DENIED = ("mount", "ptrace", "process_vm_readv", "keyctl", "add_key", "bpf", "perf_event_open", "userfaultfd")


def _program(folder, name, source):
    """``folder`` as a sandbox input with ``lib/<name>.py`` holding ``source``."""
    lib = Path(folder) / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / f"{name}.py").write_text(textwrap.dedent(source))
    return folder


def _run(folder, name, source, **options):
    outcome = sandbox.run(_program(folder, name, source), LIMITS, module=name, **options)
    assert outcome.returncode == 0, outcome.log
    return json.loads(outcome.results.decode().strip().splitlines()[-1])


def _assert_denied(report):
    """What a hostile program must not manage, wherever the grader runs."""
    assert report["uid"] != 0
    assert report["core_pattern"] in ("EROFS", "EACCES")
    assert report["writable"] == []
    assert report["unshare_user"] == "EPERM" and report["unshare_command"] != 0
    assert report["clone_newuser"] == "EPERM"
    assert {name: report[name] for name in DENIED} == {name: "EPERM" for name in DENIED}


needs_x86_64 = pytest.mark.skipif(platform.machine() != "x86_64",
                                  reason="the hostile program uses x86-64 syscall numbers")


@needs_x86_64
@pytest.mark.skipif(not ROOT, reason="the grader is not root here")
def test_as_root_the_sandbox_is_not_root_and_cannot_touch_the_kernel(tmp_path):
    """Not host root: besides the kernel's files, a host file that only root may read (0600) is bound in, and
    stays unreadable (a uid 0 mapped to another number inside would still read it)."""
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    report = _run(tmp_path / "input", "hostile", HOSTILE, extra_ro=[secret], env={"SECRET": str(secret)})
    _assert_denied(report)
    assert report["root_only_file"] == "EACCES"
    assert (report["uid"], report["gid"]) == (65534, 65534)
    assert all(options.split(",")[0] == "ro" for options in report["mount_options"].values() if options)
    assert report["keys_readable"] != "ok" and report["timer_list_readable"] != "ok"


@needs_x86_64
def test_as_a_normal_user_the_same_attacks_fail(tmp_path):
    """The grader itself unprivileged: run as root, it starts a grader as uid 65534 (with the Python installation
    made reachable as :func:`bngrade.sandbox.bwrap._reveal` does for the sandbox)."""
    if not ROOT:
        _assert_denied(_run(tmp_path, "hostile", HOSTILE))
        return
    folder = _program(tmp_path / "input", "hostile", HOSTILE)
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    os.chmod(tmp_path, 0o755)
    grader = textwrap.dedent(f"""
        import json, os, sys
        from bngrade import sandbox
        assert os.getuid() == 65534
        limits = sandbox.Limits(memory=2 * sandbox.GiB, processes=1024, wall=120)
        outcome = sandbox.run({str(folder)!r}, limits, module="hostile")
        print(outcome.results.decode() if outcome.returncode == 0 else outcome.log)
    """)
    reach = [*box._python_roots(), str(Path(box.__file__).parents[2]), str(tmp_path)]
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home))
    proc = subprocess.run([sys.executable, "-c", grader], capture_output=True, text=True, env=env, cwd=home,
                          preexec_fn=lambda: box._drop((65534, 65534), box._blocked(reach)), timeout=300)
    if "cannot create namespaces" in proc.stderr or "setting up uid map" in proc.stdout:
        pytest.skip(f"uid 65534 cannot make user namespaces here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_denied(json.loads(proc.stdout.strip().splitlines()[-1]))


@needs_x86_64
def test_without_the_denylist_those_calls_would_succeed(tmp_path, monkeypatch):
    """The attacks are real: with an empty denylist, ptrace, process_vm_readv, keyctl, add_key and userfaultfd
    work. A user namespace is still refused, by ``--disable-userns`` alone."""
    import pyseccomp

    allow_all = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    allow_all.add_rule(pyseccomp.ERRNO(errno.EPERM), "acct")
    with open(tmp_path / "empty.bpf", "wb") as out:
        allow_all.export_bpf(out)
    monkeypatch.setattr(seccomp, "bpf", lambda: (tmp_path / "empty.bpf").read_bytes())
    report = _run(tmp_path / "input", "hostile", HOSTILE)
    assert {n: report[n] for n in ("ptrace", "process_vm_readv", "keyctl", "add_key", "userfaultfd")} == dict.fromkeys(
        ("ptrace", "process_vm_readv", "keyctl", "add_key", "userfaultfd"), "ok")
    assert report["unshare_user"] not in ("ok", "EPERM")   # ENOSPC: no user namespace may be made
    assert report["writable"] == [] and report["uid"] != 0


def test_what_a_notebook_needs_still_works(tmp_path):
    report = _run(tmp_path, "honest", HONEST)
    assert report == {"numpy": 9.0, "fork": 7, "thread": 45, "pool": [1, 2, 3], "subprocess": 0,
                      "loopback": "ping", "gloo": [1.0, 1.0, 1.0]}


@pytest.mark.skipif(not ROOT, reason="the grader is not root here")
def test_two_sandboxes_at_once_do_not_share_a_process_limit(tmp_path):
    """With a pids cgroup, RLIMIT_NPROC is left unset: it would count both sandboxes' processes (one uid) together,
    and 2 x 41 processes at once would pass a limit of 64 for each."""
    trial = box.Cgroup(LIMITS)
    pids = "pids" in trial.controllers
    trial.kill_and_remove()
    if not pids:
        pytest.skip("no pids cgroup here: RLIMIT_NPROC is the process limit")
    forks = """
    import json, os, time
    kids = []
    for _ in range(40):
        pid = os.fork()
        if pid == 0:
            time.sleep(3)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    print(json.dumps(len(kids)))
    """
    limits = sandbox.Limits(memory=1 * sandbox.GiB, processes=64, wall=60)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda i: sandbox.run(_program(tmp_path / str(i), "forks", forks), limits,
                                                       module="forks"), range(2)))
    assert [o.results.decode().strip() for o in outcomes] == ["40", "40"], [o.log[-500:] for o in outcomes]


def test_hide_makes_a_package_unimportable_and_leaves_the_others(tmp_path):
    import torch

    probe = r'''
    import importlib, json
    found = {}
    for name in ("torch", "numpy"):
        try:
            importlib.import_module(name)
            found[name] = "ok"
        except ImportError as exc:
            found[name] = type(exc).__name__ + ": " + str(exc)
    print(json.dumps(found))
    '''
    report = _run(tmp_path, "probe", probe, hide=[Path(torch.__file__).parent])
    assert report == {"torch": "ModuleNotFoundError: No module named 'torch' (hidden in this sandbox)", "numpy": "ok"}


@pytest.mark.skipif(not ROOT, reason="the grader is not root here")
def test_the_sandbox_uid_is_configurable_and_never_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BNGRADE_SANDBOX_UID", "4321")
    report = _run(tmp_path, "ids", "import json, os\nprint(json.dumps([os.getuid(), os.getgid()]))")
    assert report == [4321, 4321]
    monkeypatch.setenv("BNGRADE_SANDBOX_UID", "0")
    with pytest.raises(sandbox.NoSandbox, match="must not be 0"):
        sandbox.run(tmp_path, LIMITS, module="ids")


def test_without_libseccomp_no_sandbox_is_made(tmp_path, monkeypatch):
    """A missing seccomp library refuses grading (as a missing bwrap does), never a sandbox without the filter."""
    monkeypatch.setitem(sys.modules, "pyseccomp", None)
    seccomp.bpf.cache_clear()
    try:
        assert "pyseccomp" in sandbox.available()
        with pytest.raises(sandbox.NoSandbox, match="seccomp"):
            sandbox.command(tmp_path, LIMITS)
    finally:
        seccomp.bpf.cache_clear()
