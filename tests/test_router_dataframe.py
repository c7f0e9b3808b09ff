"""Dask DataFrames (built as Dask expressions, lowered to flat graphs) under the router."""

from __future__ import annotations

import gc
import warnings

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import jupyter_mesh as jm

from .meshes import fresh_local_mesh


@pytest.fixture(scope="module")
def mesh():
    with fresh_local_mesh(cpu=1, jax_cpu=1, threads_per_worker=1) as m:
        yield m


@pytest.fixture(scope="module")
def frames():
    df = dd.from_pandas(pd.DataFrame({"v": np.arange(200.0), "k": np.arange(200) % 7}),
                        npartitions=4)
    other = dd.from_pandas(pd.DataFrame({"k": np.arange(7), "w": np.arange(7) * 10.0}),
                           npartitions=2)
    return df, other


def _same(got, want):
    if isinstance(want, pd.DataFrame):
        cols = list(want.columns)
        pd.testing.assert_frame_equal(got.sort_values(cols).reset_index(drop=True),
                                      want.sort_values(cols).reset_index(drop=True))
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got.sort_index(), want.sort_index())
    else:
        assert type(got) is type(want) and got == want, (got, want)


CASES = {
    "mean": lambda df, o: df.v.mean(),
    "max == min": lambda df, o: df.v.max() == df.v.min(),
    "max - min": lambda df, o: df.v.max() - df.v.min(),
    "describe": lambda df, o: df.describe(),
    "quantile": lambda df, o: df.v.quantile(0.5),
    "centered": lambda df, o: df.v - df.v.mean(),
    "above the mean": lambda df, o: df[df.v > df.v.mean()].k.sum(),
    "value_counts": lambda df, o: df.v.value_counts(),
    "groupby": lambda df, o: df.groupby("k").v.sum(),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("route", ["auto", "cpu:jax"])
def test_a_routed_dataframe_computes_what_dask_computes(mesh, frames, case, route):
    # Dask hands a scheduler a DataFrame's graph flat; its culling dropped tasks still
    # needed, whose keys later tasks took as values (the mean divided a tuple of key
    # names; max == min came back as an array of two Falses)
    e = CASES[case](*frames)
    (want,) = mesh.compute(e, route="off")
    with mesh.route(route):
        got = e.compute()
    _same(got, want)
    assert mesh.last_report is not None
    (got,) = mesh.compute(e, route=route)
    _same(got, want)


@pytest.mark.parametrize("column", [
    pd.array(list("abcabc"), dtype="string"),            # pandas' text
    pd.Categorical(list("abcabc")),
    pd.array([1, 2, 3, 1, 2, 3], dtype="Int64"),          # nullable integers
    pd.date_range("2026-01-01", periods=6, tz="UTC"),     # dates with a time zone
], ids=["string", "category", "Int64", "datetime-tz"])
def test_columns_of_pandas_own_dtypes_compute_under_a_jax_route(mesh, column):
    # JAX's op check asked NumPy for their dtype: TypeError "Cannot interpret
    # '<StringDtype(na_value=<NA>)>' as a data type" (NumPy runs them)
    pdf = pd.DataFrame({"k": column, "v": range(6)})
    df = dd.from_pandas(pdf, npartitions=2)
    first = pdf.k.iloc[0]
    for e, pandas in [((df.k == first).sum(), (pdf.k == first).sum()),
                      (df[df.v > 1].k, pdf[pdf.v > 1].k),
                      (df.v[df.k == first].sum(), pdf.v[pdf.k == first].sum())]:
        (want,) = mesh.compute(e, route="off")
        (got,) = mesh.compute(e, route="cpu:jax")
        _same(got, want)
        assert np.all(got == pandas)


@pytest.mark.parametrize("how", ["merge", "set_index"])
def test_a_p2p_shuffle_kept_at_a_site_is_refused_with_advice_that_works(mesh, frames, how):
    # the advice named only the rechunk's method: a merge or set_index (P2P by default
    # on a cluster) with site= or pin= got nothing that helped
    df, other = frames
    site = mesh.inventory().devices[0].site
    shuffles = {"merge": lambda **kw: df.merge(other, on="k", **kw),
                "set_index": lambda **kw: df.set_index("k", **kw)}[how]
    with pytest.raises(jm.MeshError, match=r"shuffle_method='tasks' \(or "
                                           r"dataframe.shuffle.method 'tasks'\)"):
        mesh.compute(shuffles(), site=site)
    (want,) = mesh.compute(shuffles(), route="off")
    (got,) = mesh.compute(shuffles(shuffle_method="tasks"), site=site)
    _same(got.reset_index(), want.reset_index())
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        (got,) = mesh.compute(shuffles(), site=site)
    _same(got.reset_index(), want.reset_index())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["merge", "shuffle", "set_index"])
@pytest.mark.parametrize("route", ["cpu:jax", "cpu", "auto"])
def test_a_dataframes_p2p_shuffle_under_a_forced_route_finishes(mesh, frames, how, route):
    # Dask's P2P pins each output to a worker of its choosing; restricted to a pool
    # too, an output pinned to a worker of another pool waited for ever ('no-worker')
    df, other = frames
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        e = {"merge": lambda: df.merge(other, on="k", how="left"),
             "shuffle": lambda: df.shuffle("k"),
             "set_index": lambda: df.set_index("k")}[how]()
        (want,) = mesh.compute(e, route="off")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (Dask's P2P logs of its own)
            (got,) = mesh.compute(e, route=route)
    # P2P's own steps record no backend: they ran, and the report does not say they did
    # not ("results came from elsewhere")
    notes = " ".join(mesh.last_report.notes)
    assert "not run by this computation" not in notes, notes
    # nor does the plan say it placed them: Dask does, whatever the route
    steps = ("shuffle-transfer", "shuffle-barrier", "p2pshuffle", "hashjoinp2p")
    p2p = [r for r in mesh.last_plan.rows if r["op"].startswith(steps)]
    assert p2p and all(r["target"] == "any (Dask's P2P places it)" for r in p2p), p2p
    placed = [op for n in mesh.last_plan.notes if "natively" in n
              for op in n.split(":")[0].split(", ")]
    assert not any(op.startswith(steps) for op in placed), placed
    assert placed or route != "cpu:jax"  # (JAX runs none of a frame's ops)
    if how == "set_index":
        pd.testing.assert_frame_equal(got.sort_values(["v"]), want.sort_values(["v"]))
    else:
        _same(got, want)


def test_explain_names_a_dataframes_ops_and_runs_dasks_optimization(mesh, tmp_path):
    # a DataFrame's graph was one opaque op named after a Python id, and ran without
    # Dask's expression optimization (a column's sum read every column of the file)
    pdf = pd.DataFrame({f"c{i}": np.arange(4000.0) + i for i in range(12)})
    dd.from_pandas(pdf, npartitions=4).to_parquet(tmp_path / "pq")
    e = dd.read_parquet(tmp_path / "pq").c3.sum()
    plan = mesh.explain(e)
    ops = [r["op"] for r in plan.rows]
    assert not any(op.startswith("graph-") for op in ops), ops
    assert any("parquet" in op for op in ops) and any("sum" in op for op in ops), ops
    # as dask.compute runs it: no more tasks than its optimized graph has
    unoptimized = len(e.__dask_graph__())
    assert plan.ntasks < unoptimized, (plan.ntasks, unoptimized)
    (got,) = mesh.compute(e)
    assert got == pdf.c3.sum()


def test_a_routed_cell_computes_a_dataframe(ip, mesh, frames):
    df, _ = frames
    ip.user_ns["df"] = df
    ip.run_cell_magic("mesh", "--route auto",
                      "m = df.v.mean().compute()\nn = (df.v.max() == df.v.min()).compute()")
    assert ip.user_ns["m"] == 99.5
    assert type(ip.user_ns["n"]) is np.bool_ and not ip.user_ns["n"]


def test_a_flat_graphs_layers_keep_every_task_a_result_needs():
    from dask.core import flatten

    from jupyter_mesh.router.classify import _cycles_merged, model_graph

    df = dd.from_pandas(pd.DataFrame({"v": np.arange(40.0)}), npartitions=4)
    expr = df.v.mean().expr.optimize()
    flat = dict(expr.__dask_graph__())
    keys = list(flatten(expr.__dask_keys__()))
    model = model_graph(flat, keys)
    assert len(model.keys) == len(flat)
    # layers that need each other become one, so culling can still walk them in order
    assert _cycles_merged({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == {
        "a": "a", "b": "a", "c": "a", "d": "d", "e": "e"}


def _double(i):
    return i * 2


def test_several_delayed_values_and_a_frames_parts_compute_together(mesh, frames):
    # grouped into layers one collection at a time, two delayed values of one function
    # made two layers of one name, and merging them kept one: "no task for key"
    df, _ = frames
    values = [dask.delayed(_double)(i) for i in range(4)]
    assert mesh.compute(*values) == (0, 2, 4, 6)
    assert mesh.compute(values) == ([0, 2, 4, 6],)
    assert mesh.compute(*dask.delayed(divmod, nout=2)(7, 2)) == (3, 1)
    plan = mesh.explain(*values)
    assert plan.ntasks == 4
    parts = df.v.to_delayed()
    got = mesh.compute(*parts)
    pd.testing.assert_series_equal(pd.concat(got), df.v.compute(scheduler="sync"))
    total, first = mesh.compute(df.v.sum(), parts[0])
    assert total == 19900.0
    pd.testing.assert_series_equal(first, parts[0].compute(scheduler="sync"))


@pytest.mark.parametrize("route", ["off", "auto", "cpu:jax"])
def test_collections_of_several_kinds_come_back_in_their_places(mesh, frames, route):
    # Dask (2026.8) puts collections of one optimizer together and returns (array,
    # bag, array) as (array, array, bag): route="off" gave the bag's sum for the second
    # array, and a routed persist handed the bag the second array's futures
    df, _ = frames
    x = da.arange(40, chunks=10, dtype="float64")
    b = db.from_sequence(range(20), npartitions=4)
    d = dask.delayed(_double)(5)
    got = mesh.compute(x.sum(), b.sum(), (x + 1).sum(), d, df.v.sum(), route=route)
    assert got == (780.0, 190, 820.0, 10, 19900.0)
    with mesh.route(route if route != "off" else "auto"):
        xs, bs, x1 = dask.persist(x, b, x + 1)
    assert isinstance(bs, db.Bag) and isinstance(x1, da.Array)
    assert x1.sum().compute() == 820.0 and xs.sum().compute() == 780.0
    del x1, xs  # (the bag held the array's futures, and lost them here)
    gc.collect()
    assert mesh.client.compute(bs).result(timeout=30) == list(range(20))


def test_a_computation_refused_before_it_runs_leaves_the_last_report(mesh):
    x = da.arange(40, chunks=10, dtype="float64")
    mesh.compute(x.sum())
    plan, report = mesh.last_plan, mesh.last_report
    assert report is not None
    for kwargs in ({"site": "nowhere"}, {"route": "gpu"}, {"route": "warp"}):
        with pytest.raises(jm.MeshError):
            mesh.compute((x * 3).max(), **kwargs)
        assert mesh.last_plan is plan and mesh.last_report is report
    with pytest.raises(jm.MeshError, match=r"^ran_on takes an op's label \(a row's 'op'"):
        report.ran_on(5)
    assert report.ran_on("sum") and set(report.ran_on("sum")) <= {"numpy", "jax"}


@pytest.mark.parametrize("route", ["auto", "cpu", "cpu:jax"])
def test_a_persisted_delayed_value_computes_and_explains(mesh, route):
    # its graph is its key and the future that holds it: "no task for key"
    dp = mesh.client.persist(dask.delayed(_double)(21))
    assert mesh.compute(dp, route=route) == (42,)
    assert mesh.compute(dp, dp + 1, route=route) == (42, 43)
    assert mesh.explain(dp, route=route).ntasks == 1


def test_a_collection_persisted_whole_says_nothing_runs(mesh):
    # its plan was "0 tasks in 0 ops", an empty table and a note of Dask's measured
    # costs: nothing said why
    xp = mesh.client.persist(da.ones(10, chunks=5))
    plan = mesh.explain(xp)
    assert plan.ntasks == 0
    assert plan.notes == ["nothing to run: the results are held on the workers already "
                          "(persisted earlier), and Dask hands them over"]
    (got,) = mesh.compute(xp)
    assert got.tolist() == [1.0] * 10
    assert mesh.last_report.notes == ["nothing ran: the results were held on the workers "
                                      "already (persisted earlier), and Dask handed them over"]
    assert "nothing ran" in repr(mesh.last_report)


@pytest.mark.parametrize("route", ["auto", "cpu", "cpu:jax"])
def test_a_persisted_bag_reduction_computes_and_explains(mesh, route):
    # a bag's sum or count persisted is one key and its future, as a delayed value:
    # mesh.compute and mesh.explain said "the graph has no task for key 'sum-aggregate-..'"
    b = db.from_sequence(range(10), npartitions=3)
    s, n = mesh.client.persist([b.sum(), b.count()])
    assert mesh.compute(s, route=route) == (45,)
    assert mesh.compute({"total": s, "n": n}, route=route) == ({"total": 45, "n": 10},)
    assert mesh.explain(s, route=route).ntasks == 1


def test_pinning_a_persisted_collection_says_why_it_cannot(mesh):
    # it said the collection was "not an input of this computation"
    site = next(iter(mesh.inventory())).site
    x = da.arange(40, chunks=10, dtype="float64")
    xp = mesh.client.persist(x)
    with pytest.raises(jm.MeshError, match=r"^a pinned collection is persisted already: "
                                           r"its data is where Dask put it"):
        mesh.compute((xp * 2).sum(), pin={site: xp})
    # a persisted delayed value too (its graph has no task at all: "no task for key")
    dp = mesh.client.persist(dask.delayed(_double)(3))
    with pytest.raises(jm.MeshError, match=r"^a pinned collection is persisted already"):
        mesh.compute(dp, pin={site: dp})
    assert mesh.compute(dp, (x * 2).sum(), pin={site: x}) == (6, 1560.0)
    assert mesh.compute((x * 2).sum(), pin={site: x}) == (1560.0,)


def test_a_persisted_bags_sum_reports_only_the_tasks_that_ran(mesh):
    # Dask's flat graph held a fused copy of the last op and the finalize task
    # (sum-aggregate-finalize-...) that nothing read: the report counted it, as an op
    # "not run by this computation: its results came from elsewhere"
    b = db.from_sequence(range(10), npartitions=3)
    with mesh.route("auto"):
        pb = b.persist()
        assert pb.sum().compute() == 45
    report = mesh.last_report
    assert all(r["backends"] for r in report.rows), report
    assert not any("not run by this computation" in n for n in report.notes), report


def test_a_bags_rows_name_dasks_ops_not_the_routers_own(mesh):
    with mesh.route("auto"):
        b = db.from_sequence(range(20), npartitions=4).map(_double).persist()
    ops = [r["op"] for r in mesh.last_report.rows]
    # Dask's ops as the bag's graph names them (and not the fused copy of them that
    # Dask's optimization also made, which nothing read)
    assert "jupyter-mesh-rest" not in ops and ops == ["from_sequence", "_double"], ops
    assert mesh.last_report.ran_on("_double") == ["numpy"]
    assert sorted(mesh.client.compute(b).result(timeout=30)) == list(range(0, 40, 2))


@pytest.mark.parametrize("op", ["diff", "shift", "rolling"])
def test_ops_that_pass_blocks_between_partitions_give_dasks_numbers(mesh, frames, op):
    # Dask hands a partition's neighbours over in a tuple of its own (CombinedOutput);
    # the device wrapper rebuilt it as a plain tuple, and Dask's overlap found none
    df, _ = frames
    e = {"diff": lambda: df.v.diff(), "shift": lambda: df.v.shift(2),
         "rolling": lambda: df.v.rolling(3).mean()}[op]()
    want = e.compute(scheduler="sync")
    (got,) = mesh.compute(e, route="cpu:jax")
    pd.testing.assert_series_equal(got, want)
    with mesh.route("auto"):
        pd.testing.assert_series_equal(e.compute(), want)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["merge", "shuffle"])
def test_a_p2p_shuffle_planned_per_layer_finishes_too(mesh, frames, how):
    # (what the tests above check, for a graph planned per layer)
    df, other = frames
    with dask.config.set({"dataframe.shuffle.method": "p2p",
                          "mesh.router.layer-plan-threshold": 1}):
        e = df.merge(other, on="k", how="left") if how == "merge" else df.shuffle("k")
        (want,) = mesh.compute(e, route="off")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (Dask's P2P logs of its own)
            (got,) = mesh.compute(e, route="cpu:jax")
        assert "planned per layer" in " ".join(mesh.last_plan.notes)
    _same(got, want)


class _MyScalar(dd.dask_expr._collection.Scalar):
    """A frame class of another package (as dask_cudf's and dask_geopandas' are)."""


def test_a_frame_class_of_another_package_is_optimized_too(mesh, tmp_path):
    pdf = pd.DataFrame({f"c{i}": np.arange(400.0) + i for i in range(6)})
    dd.from_pandas(pdf, npartitions=2).to_parquet(tmp_path / "pq")
    e = dd.read_parquet(tmp_path / "pq").c2.sum()
    mine = _MyScalar(e.expr)
    assert mesh.explain(mine).ntasks == mesh.explain(e).ntasks < len(e.__dask_graph__())
    assert mesh.compute(mine) == (pdf.c2.sum(),)


def test_a_forced_jax_route_plans_dataframe_operators_off_jax_and_says_why():
    # pandas' getitem, mul, floordiv were planned (and labelled) cpu:jax, ran NumPy on
    # the JAX worker, and the data went back and forth between the workers
    import dask.dataframe as dd
    import pandas as pd

    from jupyter_mesh.router import plan_collections

    from .test_router_plan import CPU, dev

    devs = [dev("c0", "cpu", "numpy", CPU), dev("j0", "cpu", "jax", CPU)]
    df = dd.from_pandas(pd.DataFrame({"i": np.arange(40), "x": np.arange(40.0)}),
                        npartitions=4)
    plan = plan_collections([(df.i // 7 + df.x * 2).sum()], devs, route="cpu:jax")
    assert "cpu:jax" not in {r["target"] for r in plan.rows}, plan
    assert any("ops on data of no known array type (a DataFrame's, a delayed value's) "
               "natively; placed on host NumPy" in n for n in plan.notes), plan.notes
