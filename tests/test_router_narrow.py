"""Live: a plan that keeps a pool's work on some of its workers is run that way."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from jupyter_mesh.router.api import run_plan

from .meshes import fresh_local_mesh


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=2) as m:
        yield m


def _plan_on_the_numpy_pool(mesh):
    """(collection's blocks computed by Dask, its plan on the mesh's NumPy pool, that
    pool, the number of the pool's first worker: workers are numbered across pools)."""
    x = da.random.random((400, 400), chunks=100)
    y = ((x @ x.T) + 1).sum(axis=0)
    expected = y.compute(scheduler="sync")
    plan = mesh.explain(y, route="cpu:numpy")
    (pool,) = {plan.pool_of[i] for i in range(plan.ntasks)}
    assert len(plan.pools[pool].workers) == 2
    return expected, plan, pool, sum(len(p.workers) for p in plan.pools[:pool])


def test_plan_on_one_of_two_workers_runs_there(mesh):
    expected, plan, pool, first = _plan_on_the_numpy_pool(mesh)
    # as the planner decides when moving data costs more than computing it: every
    # task on the pool's first worker
    plan.worker_of = [first] * plan.ntasks
    chunks = run_plan(mesh, plan)  # the output blocks, in order
    np.testing.assert_allclose(np.concatenate(chunks), expected)
    ran = {worker for worker, _, _ in mesh.last_report.records.values()}
    assert ran == {plan.pools[pool].workers[0]}


def test_tasks_the_plan_keeps_together_run_on_their_worker(mesh):
    # plan.kept: those tasks run on their planned worker (the plan uses both workers,
    # so the others may run on either, as Dask balances them)
    expected, plan, pool, first = _plan_on_the_numpy_pool(mesh)
    labels = [plan.model.ops[li].label for li in plan.model.layer]
    kept = [i for i, label in enumerate(labels) if label == "matmul"]
    plan.worker_of = [first + 1 if i in kept else first for i in range(plan.ntasks)]
    plan.kept = kept
    chunks = run_plan(mesh, plan)
    np.testing.assert_allclose(np.concatenate(chunks), expected)
    records = mesh.last_report.records
    second = plan.pools[pool].workers[1]
    assert {records[plan.model.keys[i]][0] for i in kept} == {second}
