"""Pictures of plans and reports: pure (synthetic devices, no cluster) and offline render."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import dask.array as da
import pytest

from jupyter_mesh import viz
from jupyter_mesh.devices._profile import Profile
from jupyter_mesh.inventory import Device
from jupyter_mesh.router import Report, plan_collections
from jupyter_mesh.router.plan import _secs

NUMPY = Profile(flops32=2e11, flops64=1e11, mem_bandwidth=2e10, launch_latency=2e-6,
                method="model", source="test")
JAX = Profile(flops32=4e11, flops64=2e11, mem_bandwidth=2e10, launch_latency=2e-5,
              method="model", source="test")


@pytest.fixture(autouse=True)
def fresh_kernel(monkeypatch):
    """Each test starts as a kernel that has shown no picture yet."""
    monkeypatch.setattr(viz, "_bokehjs_sent", False)


def _has_bokehjs(html: str) -> bool:
    return len(html) > 500_000 and "Bokeh.embed.embed_items" in html


def _devices():
    return [
        Device("tcp://10.0.0.1:1", "cpu", "numpy", "model cpu", 1 << 34, "local", NUMPY,
               name="cpu-0", nthreads=2),
        Device("tcp://10.0.0.2:1", "cpu", "jax", "model cpu", 1 << 34, "local", JAX,
               name="jax-cpu-0", nthreads=1),
    ]


@pytest.fixture(scope="module")
def plan():
    x = da.random.random((1000, 1000), chunks=250)
    return plan_collections([((x @ x.T) + 1).sum(axis=0)], _devices())


def _report(plan, with_stream: bool) -> Report:
    """A report as if every task ran where it was planned, for as long as planned."""
    records, stream = {}, []
    for i, key in enumerate(plan.model.keys):
        pool = plan.pools[plan.pool_of[i]]
        worker = pool.workers[0]
        secs = plan.finish[i] - plan.start[i]
        records[key] = (worker, pool.backend, secs)
        stream.append({"key": key, "worker": worker, "startstops": [
            {"action": "compute", "start": 1000 + plan.start[i],
             "stop": 1000 + plan.finish[i]}]})
    names = {"tcp://10.0.0.1:1": "cpu-0", "tcp://10.0.0.2:1": "jax-cpu-0"}
    report = Report(plan, records, plan.makespan, worker_names=names)
    if with_stream:
        report.timeline = stream
    return report


def test_planned_bars_fill_every_worker_lane_without_overlap(plan):
    bars = viz.planned_bars(plan)
    assert len(bars) == len(plan.model.keys)
    assert {b["target"] for b in bars} == {p.label for p in plan.pools}
    by_row = {}
    for b in bars:
        by_row.setdefault(b["row"], []).append((b["start"], b["end"]))
    for spans in by_row.values():
        spans.sort()
        assert all(a_end <= b_start + 1e-9 for (_, a_end), (b_start, _) in
                   zip(spans, spans[1:], strict=False))
    # two threads on the NumPy worker: two lanes at most; one on the JAX worker
    assert {r for r in by_row if r.startswith("10.0.0.1")} <= {"10.0.0.1:1", "10.0.0.1:1 #2"}
    assert {r for r in by_row if r.startswith("10.0.0.2")} == {"10.0.0.2:1"}


def test_measured_bars_use_the_task_stream_and_worker_names(plan):
    bars, real = viz.measured_bars(_report(plan, with_stream=True))
    assert real
    assert {b["worker"] for b in bars} == {"cpu-0", "jax-cpu-0"}
    assert min(b["start"] for b in bars) == 0
    assert {b["target"] for b in bars} <= {"cpu:numpy", "cpu:jax"}


def test_a_one_thread_worker_gets_one_lane_despite_the_streams_jitter(plan):
    # the task stream's times of consecutive tasks on one thread overlap by a
    # millisecond or so: the JAX worker (one thread) was drawn with a phantom 2nd lane
    report = _report(plan, with_stream=True)
    mine = sorted((r for r in report.timeline if r["worker"] == "tcp://10.0.0.2:1"),
                  key=lambda r: r["startstops"][0]["start"])
    assert len(mine) >= 2
    mine[1]["startstops"][0]["start"] = mine[0]["startstops"][0]["stop"] - 0.0012
    bars, _ = viz.measured_bars(report)
    assert {b["row"] for b in bars if b["worker"] == "jax-cpu-0"} == {"jax-cpu-0"}
    # a real overlap (two threads at once) still takes a second lane
    first = mine[0]["startstops"][0]
    first["stop"] = first["start"] + 0.1
    mine[1]["startstops"][0]["start"] = first["start"] + 0.01
    bars, _ = viz.measured_bars(report)
    assert {b["row"] for b in bars if b["worker"] == "jax-cpu-0"} == {"jax-cpu-0",
                                                                       "jax-cpu-0 #2"}
    # but never more lanes than the worker has threads: on a loaded host the stream's
    # times of one thread's tasks overlapped by 6 ms (a one-thread worker got "#2")
    report.plan.worker_threads = {"jax-cpu-0": 1}
    bars, _ = viz.measured_bars(report)
    assert {b["row"] for b in bars if b["worker"] == "jax-cpu-0"} == {"jax-cpu-0"}


def test_a_worker_the_plan_did_not_know_is_labelled_with_its_own_kind(plan):
    # a worker restarted at a new address ran some tasks: its bars say what it is (a
    # CPU driven by JAX), as the mesh read it then, never a guessed kind
    report = _report(plan, with_stream=True)
    new = "tcp://10.0.0.9:1"
    moved = [k for k, (w, b, _) in report.records.items() if b == "jax"][:3]
    for k in moved:
        report.records[k] = (new, "jax", report.records[k][2])
    for r in report.timeline:
        if r["key"] in moved:
            r["worker"] = new
    report.worker_names[new] = "jax-cpu-1"
    report.worker_kinds = {new: "cpu"}
    bars, _ = viz.measured_bars(report)
    mine = [b for b in bars if b["worker"] == "jax-cpu-1"]
    assert len(mine) == 3 and {b["target"] for b in mine} == {"cpu:jax"}


def test_measured_bars_without_a_task_stream_lay_seconds_end_to_end(plan):
    bars, real = viz.measured_bars(_report(plan, with_stream=False))
    assert not real
    assert len(bars) == len(plan.model.keys)


def test_a_fused_chain_shows_a_bar_per_member_op(plan):
    # a chain the rewrite fused ran as one task: the stream has its last key only; the
    # picture still shows each op, for as long as its own device call took
    from jupyter_mesh.router.rewrite import linear_chains

    report = _report(plan, with_stream=True)
    m = plan.model
    chain = next(c for c in linear_chains(plan) if len(c) >= 2)
    keys = [m.keys[i] for i in chain]
    first, last = keys[0], keys[-1]
    report.timeline = [r for r in report.timeline if r["key"] not in keys[:-1]]
    for r in report.timeline:
        if r["key"] == last:
            r["startstops"][0]["start"] = 1000 + plan.start[chain[0]]
    report.fused = {last: keys}
    bars, real = viz.measured_bars(report)
    assert real
    mine = [b for b in bars if b["key"] in {str(k) for k in keys}]
    assert [b["key"] for b in mine] == [str(k) for k in keys]
    assert [b["op"] for b in mine] == [m.ops[m.layer[i]].label for i in chain]
    for a, b in zip(mine, mine[1:], strict=False):  # end to end, no overlap
        assert a["end"] == pytest.approx(b["start"])
    secs = report.records[first][2]
    assert mine[0]["end"] - mine[0]["start"] == pytest.approx(secs)


def test_op_graph_follows_the_dataflow(plan):
    graph = viz.op_graph(plan)
    ops = [n["op"] for n in graph["nodes"]]
    assert "matmul" in ops and "random_sample" in ops
    x = {n["op"]: n["x"] for n in graph["nodes"]}
    assert x["random_sample"] < x["matmul"] < x["sum-aggregate"]
    assert all(n["target"] in {"cpu:numpy", "cpu:jax"} for n in graph["nodes"])


def test_op_graph_has_a_node_per_row_of_the_table_and_a_bounded_size(plan):
    # a loop of 300 delayed calls of one function is one op, as in the plan's table
    # (a node each made the picture 18,000 px tall); past MAX_NODES ops, those with
    # the most tasks are shown, and the picture says so
    import dask

    calls = [dask.delayed(lambda i: i + 1, pure=True)(i) for i in range(300)]
    total = dask.delayed(sum)(calls)
    many = plan_collections([total], _devices())
    graph = viz.op_graph(many)
    assert len(graph["nodes"]) == len(many.rows) == graph["ops"] < 10
    assert max(n["tasks"] for n in graph["nodes"]) == 300
    small = viz.op_graph(plan, most=2)
    assert small["shown"] == 2 and small["ops"] == len(plan.rows) > 2
    # the op that gives the result, and the one with the most tasks
    assert [n["op"] for n in small["nodes"]][-1] == plan.rows[-1]["op"] == "sum-aggregate"
    assert small["nodes"][0]["tasks"] == max(r["tasks"] for r in plan.rows)
    fig = viz._graph(small, "Operations", 600)
    assert "showing 2 of" in fig.title.text
    tall = {"nodes": [{"op": f"op{k}", "class": "other", "tasks": 1, "target": "cpu:numpy",
                       "targets": "cpu:numpy×1", "x": 0.0, "y": float(k)}
                      for k in range(1000)], "edges": []}
    assert viz._graph(tall, "Operations", 600).height <= viz.MAX_GRAPH_HEIGHT


def test_a_long_chain_of_ops_widens_the_picture_and_its_nodes_never_overlap():
    # 40 ops in a row: circles of 34 px were 15 px apart, and labels ran together
    def chain(n):
        return {"nodes": [{"op": f"layer_{k:02d}_transform", "class": "elementwise",
                           "tasks": 64, "target": "cpu:numpy", "targets": "cpu:numpy×64",
                           "x": float(k), "y": 0.0} for k in range(n)],
                "edges": [(k, k + 1) for k in range(n - 1)]}

    for n, labelled in ((40, True), (200, False)):
        fig = viz._graph(chain(n), "Operations", 900)
        assert 900 < fig.width <= viz.MAX_GRAPH_WIDTH
        px_per_op = 0.75 * fig.width / (fig.x_range.end - fig.x_range.start)
        source = next(r.data_source for r in fig.renderers if hasattr(r, "data_source")
                      and "size" in r.data_source.data)
        assert max(source.data["size"]) <= px_per_op  # (circles apart)
        labels = source.data["label"]
        if labelled:  # short labels, two columns apart on each side
            assert all(labels) and max(map(len, labels)) * 6.5 <= 2 * px_per_op
        else:  # no room for any: the hover names them, and the title says so
            assert not any(labels) and "hover over a node" in fig.title.text
    # a short one keeps the width asked for
    assert viz._graph(chain(5), "Operations", 900).width == 900


def test_thousands_of_ops_keep_the_tables_and_the_picture_bounded():
    # 3,000 distinct delayed functions are 3,000 ops: the tables show MAX_ROWS of them
    # and say what the rest are; the picture keeps the op of the result, and lays a
    # wide level out in columns, not one column 200 nodes tall
    import dask

    from jupyter_mesh.router.plan import MAX_ROWS

    calls = [dask.delayed(type(f"op_{i:04d}", (), {"__call__": lambda self, v: v + 1})(),
                          pure=True)(i) for i in range(3000)]
    total = dask.delayed(sum)(calls)
    many = plan_collections([total], _devices())
    assert len(many.rows) > 3000 > MAX_ROWS
    text = repr(many)
    assert len(text.splitlines()) < MAX_ROWS + 20
    assert f"… {len(many.rows) - MAX_ROWS} more ops (" in text and ".rows has every op" in text
    table = many._repr_html_().split("<table>")[1].split("</table>")[0]
    assert table.count("<tr>") == MAX_ROWS + 2  # the header, the rows, what the rest are
    graph = viz.op_graph(many)
    assert graph["shown"] == viz.MAX_NODES and graph["ops"] == len(many.rows)
    assert "sum" in [n["op"] for n in graph["nodes"]]
    column = Counter(n["x"] for n in graph["nodes"])
    assert max(column.values()) <= viz.GRAPH_COLUMN and len(column) > 10
    assert viz._graph(graph, "Operations", 900).height <= viz.MAX_GRAPH_HEIGHT


def test_pictures_show_the_targets_the_plan_rows_show():
    # a JAX CPU worker running an op with NumPy ("cpu:jax (numpy)"), and a plan that
    # restricts nothing ("any (pools equivalent)"), are coloured as the rows name them
    from jupyter_mesh.router.plan import EQUIVALENT

    slow = Profile(flops32=1e11, flops64=5e10, mem_bandwidth=4e10, launch_latency=2e-6,
                   method="model", source="test")

    def devices(jax_profile):
        jax = Device("tcp://10.0.0.2:1", "cpu", "jax", "model cpu", 1 << 34, "local",
                     jax_profile, name="jax-cpu-0")
        jax.extra = {"numpy_profile": NUMPY.to_dict()}
        return [Device("tcp://10.0.0.1:1", "cpu", "numpy", "model cpu", 1 << 34, "local",
                       NUMPY, name="cpu-0"), jax]

    x = da.random.random((2000, 2000), chunks=500)
    y = ((x @ x.T) * 2 + 1).sum(axis=0)
    mixed = plan_collections([y], devices(slow))
    rows = {t for r in mixed.rows for t in r["target"].split(" + ")}
    assert any(t.startswith("cpu:jax (numpy)") for t in rows)
    shown = {b["target"] for b in viz.planned_bars(mixed)}
    assert "cpu:jax (numpy)" in shown
    assert {n["target"] for n in viz.op_graph(mixed)["nodes"]} <= {
        t.split("×")[0] for t in rows}
    assert viz.colour_of("cpu:jax (numpy)") not in (viz.colour_of("cpu:jax"),
                                                    viz.colour_of("cpu:numpy"))
    # the JAX worker's NumPy as fast as the NumPy worker's: nothing restricted
    same = plan_collections([y], devices(NUMPY))
    assert same.unrestricted
    # the note says why the JAX worker's ops are not JAX's, and how to force JAX
    assert any("cpu:jax workers run them with NumPy" in n and 'route="cpu:jax"' in n
               for n in same.notes)
    assert {b["target"] for b in viz.planned_bars(same)} == {EQUIVALENT}
    assert {n["target"] for n in viz.op_graph(same)["nodes"]} == {EQUIVALENT}


def test_plan_repr_html_contains_table_and_picture(plan):
    out = plan._repr_html_()
    assert "<table>" in out and "matmul" in out
    assert "jupyter-mesh-picture" in out
    assert "Planned timeline" in out and "Operations, coloured by planned target" in out
    assert "Bokeh.embed.embed_items" in out  # the picture's script
    assert "https://cdn.bokeh.org" not in out  # BokehJS inline: renders offline


def test_report_repr_html_shows_planned_and_measured_side_by_side(plan):
    out = _report(plan, with_stream=True)._repr_html_()
    assert "jupyter-mesh-picture" in out
    assert "Planned (estimated)" in out and "Ran (measured)" in out
    assert "coloured by where they ran" in out
    assert "https://cdn.bokeh.org" not in out


def test_bokehjs_goes_with_the_first_picture_only(plan):
    # a notebook must not grow by 1.3 MB of BokehJS per picture: the first picture a
    # kernel shows carries it, later ones wait for that copy on the page
    first = plan._repr_html_()
    second = _report(plan, with_stream=True)._repr_html_()
    third = plan._repr_html_()
    assert _has_bokehjs(first)
    for later in (second, third):
        assert not _has_bokehjs(later) and len(later) < len(first) // 10
        assert "jupyter-mesh-picture" in later and "embed_items" in later
        assert "window.Bokeh !== undefined" in later  # waits for the first one's copy
    assert "https://cdn.bokeh.org" not in second + third


def test_bokehjs_every_time_when_asked(plan):
    import dask

    with dask.config.set({"mesh.viz.bokehjs": "every"}):
        outs = [plan._repr_html_(), plan._repr_html_()]
    assert all(_has_bokehjs(o) for o in outs)


def test_a_bad_bokehjs_setting_says_what_to_do_and_keeps_the_table(plan):
    import dask

    with dask.config.set({"mesh.viz.bokehjs": "sometimes"}):
        out = plan._repr_html_()
    assert "<table>" in out and "matmul" in out
    assert "mesh.viz.bokehjs must be &#x27;once&#x27; or &#x27;every&#x27;" in out
    assert not _has_bokehjs(out)
    assert _has_bokehjs(plan._repr_html_())  # nothing was used up by the failed one


def test_a_broken_picture_leaves_the_table(plan, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no drawing today")

    monkeypatch.setattr(viz, "plan_figure", boom)
    out = plan._repr_html_()
    assert "<table>" in out and "no picture of this plan" in out


def test_colours_are_stable_per_target():
    assert viz.colour_of("cpu:jax") == viz.colour_of("cpu:jax@us-east")
    assert viz.colour_of("cpu:numpy") != viz.colour_of("cpu:jax")


def test_one_target_at_two_sites_gets_two_shades_of_its_colour():
    # a two-site mesh drew cpu:numpy@edge and cpu:numpy@local in one colour
    colours = viz.colours_of(["cpu:numpy@edge", "cpu:numpy@local", "cpu:jax@local",
                              "cpu:numpy@edge"])
    assert colours["cpu:numpy@edge"] == viz.colour_of("cpu:numpy")  # the first site
    assert colours["cpu:numpy@local"] != colours["cpu:numpy@edge"]
    assert colours["cpu:jax@local"] == viz.colour_of("cpu:jax")  # one site: its own
    assert viz.colours_of(["gpu:cupy"]) == {"gpu:cupy": viz.colour_of("gpu:cupy")}
    # however many sites: all apart (a sixth took the first's colour again)
    for n in (3, 6, 11):
        many = viz.colours_of([f"cpu:numpy@site{i}" for i in range(n)])
        assert len(set(many.values())) == n


def _render_offline(html: str, tmp_path, wait: str) -> tuple[Any, list[str]]:
    """Open ``html`` in Debian's chromium with every non-local request refused; wait
    for the JavaScript condition ``wait``; return what it evaluates to and the
    requests refused."""
    sync_api = pytest.importorskip("playwright.sync_api")
    import os

    assert os.path.exists("/usr/bin/chromium"), "Debian's chromium is missing: run make chromium"
    page_file = tmp_path / "page.html"
    page_file.write_text(f"<html><body>{html}</body></html>")
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()

            def only_local(route):
                if route.request.url.startswith(("file:", "data:", "blob:", "about:")):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(page_file.as_uri())
            handle = page.wait_for_function(wait, timeout=30000)
            value = handle.json_value()
        finally:
            browser.close()
    return value, blocked


@pytest.mark.browser
def test_picture_renders_offline_in_chromium(plan, tmp_path):
    views, blocked = _render_offline(
        plan._repr_html_(), tmp_path,
        "() => window.Bokeh && Bokeh.documents.length > 0 && Object.keys(Bokeh.index).length")
    assert views >= 1
    assert blocked == []


@pytest.mark.browser
def test_later_pictures_use_the_first_ones_bokehjs(plan, tmp_path):
    # as in a notebook: the first output carries BokehJS, the next two render with it
    outs = [plan._repr_html_(), _report(plan, with_stream=True)._repr_html_(),
            plan._repr_html_()]
    docs, blocked = _render_offline(
        "".join(outs), tmp_path,
        "() => window.Bokeh && Bokeh.documents.length >= 3 && Bokeh.documents.length")
    assert docs == 3
    assert blocked == []


@pytest.mark.browser
def test_a_picture_without_its_bokehjs_says_how_to_get_it(plan, tmp_path, monkeypatch):
    # the output that carried BokehJS was cleared: the later picture says what to do
    plan._repr_html_()
    monkeypatch.setattr(viz, "BOKEHJS_WAIT_MS", 300)
    text, blocked = _render_offline(
        plan._repr_html_(), tmp_path,
        "() => { const el = document.querySelector('.jupyter-mesh-picture');"
        " return el && el.textContent.includes('no picture') && el.textContent; }")
    assert "mesh.viz.bokehjs" in text and "restart the kernel" in text
    assert blocked == []


@pytest.mark.browser
def test_in_a_jupyter_page_a_picture_fetches_missing_bokehjs_from_the_server(plan, tmp_path):
    # the output that carried BokehJS was cleared or re-run: in a Jupyter page (which
    # names its base URL) the picture loads BokehJS from the jupyter_mesh server
    # extension instead; here the "server" is a folder laid out like its route
    import bokeh

    plan._repr_html_()
    later = plan._repr_html_()
    assert not _has_bokehjs(later)
    served = tmp_path / "server" / "jupyter-mesh" / "static"
    served.mkdir(parents=True)
    (served / f"bokeh-{bokeh.__version__}.min.js").write_text(viz.bokehjs_source())
    config = json.dumps({"baseUrl": (tmp_path / "server").as_uri()})
    page = f'<script id="jupyter-config-data" type="application/json">{config}</script>{later}'
    docs, blocked = _render_offline(
        page, tmp_path, "() => window.Bokeh && Bokeh.documents.length")
    assert docs == 1
    assert blocked == []


def test_a_plan_made_per_layer_has_its_picture(plan):
    # graphs above mesh.router.layer-plan-threshold are planned per layer: the picture
    # shows one bar per layer in its pool's lane, and the ops coloured by target
    import dask

    x = da.random.random((1000, 1000), chunks=250)
    devices = [Device(w, pool.kind, pool.backend, "model", 1 << 34, "local", pool.profile,
                      nthreads=pool.slots)
               for pool in plan.pools for w in pool.workers]
    with dask.config.set({"mesh.router.layer-plan-threshold": 10}):
        lplan = plan_collections([((x @ x.T) + 1).sum(axis=0)], devices, route="cpu:jax")
    assert not lplan.model.keys and lplan.ntasks > 10  # planned per layer
    bars = viz.planned_bars(lplan)
    assert {b["op"] for b in bars} >= {"matmul", "random_sample"}
    by_op = {b["op"]: b for b in bars}
    assert by_op["matmul"]["target"] == "cpu:jax"
    assert by_op["random_sample"]["end"] <= by_op["matmul"]["start"] + 1e-12
    graph = viz.op_graph(lplan)
    x_of = {n["op"]: n["x"] for n in graph["nodes"]}
    assert x_of["random_sample"] < x_of["matmul"] < x_of["sum-aggregate"]
    out = lplan._repr_html_()
    assert "jupyter-mesh-picture" in out and "planned per layer" in out


def test_a_plan_made_per_task_without_tasks_has_an_empty_picture(plan):
    # a plan made per task of a graph without tasks has empty per-task lists, as a plan
    # made per layer has: the pictures tell the two apart by type, not by those lists
    from jupyter_mesh.router import plan_model
    from jupyter_mesh.router.classify import model_graph

    empty = plan_model(model_graph({}, []), plan.pools)
    assert not empty.model.keys and empty.ntasks == 0
    assert viz.planned_bars(empty) == []
    assert viz.op_graph(empty) == {"nodes": [], "edges": [], "shown": 0, "ops": 0}
    report = Report(empty, {}, 0.0)
    assert viz.measured_bars(report) == ([], False)
    assert viz.op_graph(empty, report) == {"nodes": [], "edges": [], "shown": 0, "ops": 0}
    assert viz.plan_figure(empty) is not None  # an empty timeline and graph
    assert viz.report_figure(report) is not None
    out = empty._repr_html_()
    assert "jupyter-mesh-plan" in out and "0 tasks" in out
    assert "0 tasks" in repr(empty) and "0 tasks" in report._repr_html_()
    assert "nothing moved between kinds" in repr(empty)


def test_a_timeline_of_many_tasks_keeps_every_worker_and_says_it_samples():
    from jupyter_mesh.viz import sampled_bars

    bars = ([{"row": "cpu-0", "i": i} for i in range(5727)]
            + [{"row": "jax-cpu-0", "i": i} for i in range(2677)])
    kept, title = sampled_bars(bars, "Planned timeline", most=5000)
    rows = {b["row"] for b in kept}
    assert rows == {"cpu-0", "jax-cpu-0"}  # no worker drops out of the picture
    assert len(kept) <= 5000
    assert sum(b["row"] == "jax-cpu-0" for b in kept) >= 5000 * 2677 // 8404
    assert title == f"Planned timeline (showing {len(kept)} of 8404 tasks, every row sampled)"
    few = bars[:10]
    assert sampled_bars(few, "t", most=5000) == (few, "t")


def test_a_fused_chain_and_the_next_task_on_its_thread_share_one_lane(plan):
    # the chain's last member starts after its first ones (inside the one task), so the
    # next task, starting a moment before the chain's end, was placed first and pushed
    # that member to a phantom second lane ("cpu-0 #2" on a one-thread worker)
    from jupyter_mesh.router.rewrite import linear_chains

    report = _report(plan, with_stream=True)
    m = plan.model
    chain = next(c for c in linear_chains(plan) if len(c) >= 2)
    keys = [m.keys[i] for i in chain]
    last = keys[-1]
    report.timeline = [r for r in report.timeline if r["key"] not in keys[:-1]]
    (rec,) = [r for r in report.timeline if r["key"] == last]
    worker = rec["worker"]
    ss = rec["startstops"][0]
    ss["start"], ss["stop"] = 1000.0, 1000.2
    report.records[keys[0]] = (worker, report.records[keys[0]][1], 0.1998)
    for k in keys[1:-1]:  # (the members between take no time)
        report.records[k] = (worker, report.records[k][1], 0.0)
    other = next(r for r in report.timeline if r["worker"] == worker and r is not rec)
    other["startstops"][0]["start"], other["startstops"][0]["stop"] = 1000.199, 1000.4
    report.fused = {last: keys}
    rest = [r for r in report.timeline if r["worker"] == worker and r is not rec
            and r is not other]
    for i, r in enumerate(rest):  # the worker's other tasks earlier, one at a time
        r["startstops"][0]["start"], r["startstops"][0]["stop"] = 500.0 + i, 500.5 + i
    bars, _ = viz.measured_bars(report)
    name = next(b["worker"] for b in bars if b["key"] == str(last))
    assert {b["row"] for b in bars if b["worker"] == name} == {name}


@pytest.mark.parametrize("route", ["cpu:jax", "cpu"])
def test_dasks_p2p_steps_are_drawn_as_dask_places_them(route):
    # the rows said Dask's P2P places them; the picture coloured them as the route's
    x = da.ones((8, 8), chunks=(8, 1))
    y = (x.rechunk((1, 8), method="p2p") + 1).sum()
    plan = plan_collections([y], _devices(), route=route)
    p2p = {"any (Dask's P2P places it)"}
    assert {b["target"] for b in viz.planned_bars(plan) if b["op"] == "rechunk-p2p"} == p2p
    graph = viz.op_graph(plan)
    assert {n["target"] for n in graph["nodes"] if n["op"] == "rechunk-p2p"} == p2p
    assert {r["target"] for r in plan.rows if r["op"] == "rechunk-p2p"} == p2p


def test_a_planned_timeline_shorter_than_the_estimate_says_the_estimate(plan):
    # the estimate counts Dask's own costs (a floor its notes explain): the header said
    # 341.6 ms over a timeline that ended at 0.15 s, and nothing said why
    fig = viz.plan_figure(plan)
    assert "with Dask's own costs" not in fig.children[0].title.text
    end = max(plan.finish)
    plan.floor = 3 * end
    try:
        fig = viz.plan_figure(plan)
        assert fig.children[0].title.text.endswith(
            f"; est. {_secs(3 * end)} with Dask's own costs (see the notes)")
        fig = viz.report_figure(_report(plan, with_stream=True))
        assert "with Dask's own costs" in fig.children[0].children[0].title.text
    finally:
        plan.floor = 0.0
