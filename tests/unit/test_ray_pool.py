"""The Ray executor's pool without Ray: what it refuses before asking Ray for a worker."""

from __future__ import annotations

from runner.executor import CaseResult
from runner.planner import load_plan
from runner.ray_executor import _Pool
from runner.registry import load_analyses


class NoRay:
    """Stands in for the ``ray`` module where the pool must not reach it."""

    @staticmethod
    def remote(**options):
        return lambda cls: cls

    @staticmethod
    def cluster_resources():
        return {"CPU": 2.0, "memory": 8e9}


def test_a_case_the_local_instance_cannot_hold_is_an_error_not_a_wait(tmp_path):
    load_analyses()
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: big\nsteps:\n  - id: noop\n    analysis: train_toy_model\n    resources: {num_cpus: 4}\n"
    )
    (case,) = load_plan(spec).cases
    pool = _Pool(NoRay(), {}, {}, reporter=None, fixed=True)
    pool.submit(CaseResult(case), blobs=None)
    [(result, outcome)] = pool.wait(0)
    assert result.case is case and not pool.groups and not pool.workers
    assert outcome.error == (
        "its step reserves num_cpus 4 per case, more than the local Ray instance has (CPU 2, GPU 0). "
        "Lower the step's `resources:`, or join a bigger cluster with --address."
    )
