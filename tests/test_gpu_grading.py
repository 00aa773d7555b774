"""GPU assignments: refused on a machine without a GPU, before anything is collected; a hard wall clock on a GPU."""
import subprocess
import sys

import pytest

from bngrade.pipeline import device, grading
from bngrade.pipeline.course import Course, assignments
from bngrade.pipeline.intake import Problem


def test_every_gpu_assignment_exists():
    assert device.GPU_ASSIGNMENTS <= set(assignments())


def test_grade_class_refuses_a_gpu_assignment_without_a_gpu_before_collecting(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "gpu_available", lambda: False)
    monkeypatch.setattr(grading, "collect", lambda *a, **k: pytest.fail("submissions were collected"))
    course = Course(tmp_path / "course")
    monkeypatch.setattr(course, "nbgrader", lambda *a, **k: pytest.fail("nbgrader ran"))
    for assignment in sorted(device.GPU_ASSIGNMENTS):
        with pytest.raises(Problem, match="GPU assignment.*no usable CUDA GPU.*every student 0"):
            grading.grade_class(course, assignment, tmp_path / "no-such-folder", progress=False)


def test_cpu_assignments_are_not_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "gpu_available", lambda: False)
    cpu = next(a for a in assignments() if a not in device.GPU_ASSIGNMENTS)
    device.require_device(cpu)  # no exception


@pytest.mark.skipif(device.gpu_available(), reason="this machine has a GPU, so nothing is refused")
def test_cli_refuses_a_gpu_assignment_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bngrade", "--course", str(tmp_path / "course"), "grade",
                           "ch05_cupy_kernels", str(tmp_path / "submissions"), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "GPU assignment" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "course" / "submitted").exists(), "nothing was collected"


def test_gpu_notebooks_run_under_a_shorter_hard_wall_clock():
    gpu, cpu = "ch05_cupy_kernels", "ch02_batchnorm_forward"
    assert grading.default_limits(gpu).wall == device.GPU_NOTEBOOK_WALL_SECONDS
    assert grading.default_limits(cpu).wall == grading.NOTEBOOK_WALL_SECONDS
    assert device.GPU_NOTEBOOK_WALL_SECONDS < grading.NOTEBOOK_WALL_SECONDS
