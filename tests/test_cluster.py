"""Grading on a real Dask cluster on 127.0.0.1: a scheduler and two single-slot workers, as subprocesses."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bngrade.pipeline import executors
from bngrade.pipeline.grading import grade_class
from bngrade.pipeline.intake import Problem
from bngrade.sandbox import bundle
from small_class import ASSIGNMENT, LIMITS, grades, small_course

pytestmark = pytest.mark.xdist_group("grading")
DASK = str(Path(sys.executable).with_name("dask"))


def _wait(condition, what, seconds=60):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler address, {worker name: process}); the workers run without a nanny, so a killed one stays dead."""
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    common = ["--no-dashboard"]
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file",
                               str(scheduler_file), *common], env=env, cwd=folder, stderr=subprocess.DEVNULL)]
    _wait(scheduler_file.exists, "the scheduler")
    workers = {name: subprocess.Popen([DASK, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                       "--no-nanny", "--name", name, "--host", "127.0.0.1", *common], env=env,
                                      cwd=folder, stderr=subprocess.DEVNULL)
               for name in ("w0", "w1")}
    address = json.loads(scheduler_file.read_text())["address"]
    with executors.connect(address) as client:
        client.wait_for_workers(2, timeout=60)
    yield address, workers
    for proc in procs + list(workers.values()):
        proc.kill()
        proc.wait()


def test_an_unreachable_scheduler_is_refused_before_collecting(tmp_path):
    with pytest.raises(Problem, match="cannot reach the Dask scheduler"):
        grade_class(None, ASSIGNMENT, tmp_path / "nothing", cluster="tcp://127.0.0.1:1")


def test_the_gpu_assignment_is_refused_without_a_gpu_worker(cluster, tmp_path):
    with pytest.raises(Problem, match="declares one"):
        grade_class(None, "ch05_cupy_kernels", tmp_path / "nothing", cluster=cluster[0])


def test_a_worker_whose_environment_differs_is_refused(cluster):
    """The worker compares its own fingerprint (capture helper, packages, bwrap, Python) with the bundle's."""
    blob = bundle.make_bundle("{}", "{}", {}, {}, LIMITS, "nb.ipynb", ASSIGNMENT, False)
    files = bundle._unzip(blob)
    job = json.loads(files["job.json"])
    job["fingerprint"]["capture helper"] = "0" * 64
    files["job.json"] = json.dumps(job).encode()
    with pytest.raises(bundle.EnvironmentMismatchError, match="differs from the grader's .capture helper."):
        executors.Dask(cluster[0])(bundle._zip(files))


def test_the_cluster_grades_as_locally_and_a_killed_worker_loses_nobody(cluster, tmp_path):
    """A worker killed while it runs a student: its task runs on the other worker; every student is graded
    once, with the grades of the local run."""
    address, workers = cluster
    course, subs = small_course(tmp_path)
    options = {"progress": False, "cell_timeout": 15, "jobs": 2, "limits": LIMITS, "cache": False}
    grade_class(course, ASSIGNMENT, subs, **options)
    local = grades(course)
    killed = []

    def kill_a_busy_worker():
        with executors.connect(address) as client:
            def busy():
                names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
                return [names[a] for a, tasks in client.processing().items() if tasks and a in names]
            found = []
            _wait(lambda: found.extend(busy()) or found, "a task on a worker", 300)
            name = found[0]
            workers[name].send_signal(signal.SIGKILL)
            killed.append(name)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    report, _ = grade_class(course, ASSIGNMENT, subs, cluster=address, **options)
    killer.join()
    assert killed and workers[killed[0]].wait() == -signal.SIGKILL
    assert all(not problems for problems in report.values()), report
    assert grades(course) == local


def test_the_slurm_configuration_writes_a_job_script_for_a_grading_worker():
    """Without Slurm: the README's configuration builds, and its job script starts one-slot workers in the venv."""
    from bngrade.pipeline.slurm import slurm_cluster

    with slurm_cluster("/shared/course/.venv", queue="gpu", gpu=True) as cluster:
        script = cluster.job_script()
    assert "source /shared/course/.venv/bin/activate" in script and "#SBATCH --gres=gpu:1" in script
    assert "--nthreads 1" in script and "--resources GPU=1" in script and "#SBATCH -p gpu" in script
