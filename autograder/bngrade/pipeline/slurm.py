"""A Slurm cluster of grading workers (dask-jobqueue): one single-slot worker per job, in the course's venv.

    from bngrade.pipeline.slurm import slurm_cluster
    cluster = slurm_cluster("/shared/course/.venv", queue="cpu")
    cluster.scale(jobs=16)          # 16 Slurm jobs, one grading slot each
    print(cluster.scheduler_address)   # pass it to `python -m bngrade grade --cluster ...`
"""


def slurm_cluster(venv, queue=None, gpu=False, memory="8GB", walltime="02:00:00", **options):
    """A ``dask_jobqueue.SLURMCluster`` whose workers run the sandboxed step: one thread each (a sandbox
    uses its own cores), the course's ``venv`` activated (the fingerprint must match the grader's), and
    ``GPU=1`` declared where ``gpu`` (with ``--gres=gpu:1``) for the GPU assignment."""
    from dask_jobqueue import SLURMCluster

    extra = ["--resources", "GPU=1"] if gpu else []
    return SLURMCluster(queue=queue, cores=1, processes=1, memory=memory, walltime=walltime,
                        job_script_prologue=[f"source {venv}/bin/activate"],
                        job_extra_directives=["--gres=gpu:1"] if gpu else [], worker_extra_args=extra,
                        **options)
