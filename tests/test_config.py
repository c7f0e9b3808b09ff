from __future__ import annotations

import re

import dask.config
import pytest
import yaml

import jupyter_mesh as jm
from jupyter_mesh import _config, _state
from jupyter_mesh.errors import MeshConfigError


def _walk(defaults, schema, path=""):
    """Every key of the defaults has a schema entry with a description, and back."""
    props = schema.get("properties", {})
    assert set(defaults) == set(props), f"{path}: yaml {set(defaults)} vs schema {set(props)}"
    for key, value in defaults.items():
        entry = props[key]
        assert entry.get("description"), f"{path}{key} has no description"
        if isinstance(value, dict):
            _walk(value, entry, f"{path}{key}.")


def test_defaults_and_schema_agree():
    with open(_config.SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    _walk(_config.DEFAULTS, schema)


def test_config_is_read_through_dask_config():
    assert dask.config.get("mesh.fallback-timeout") == 5
    with dask.config.set({"mesh.fallback-timeout": 7}):
        assert _config.get_seconds("fallback-timeout") == 7


@pytest.mark.parametrize("bad", [-1, "soon", float("nan")])
def test_bad_seconds_name_the_key(bad):
    with dask.config.set({"mesh.progress-after": bad}):
        with pytest.raises(MeshConfigError, match="mesh.progress-after"):
            _config.get_seconds("progress-after")


@pytest.mark.parametrize("section, value, key", [
    ("mesh.links", {"wan-latency": 0.06}, "links.network-latency"),
    ("mesh.links", 5, "links.network-latency"),
    ("mesh.profile", {"measure-seconds": 0.3}, "profile.cache-dir"),
    ("mesh", {"fallback-timeout": 3}, "links.network-latency"),  # the whole of mesh
])
def test_a_section_set_as_a_whole_says_how_to_set_one_key(section, value, key):
    # dask.config.set of a section replaces its other keys: a bare KeyError (or
    # TypeError) and 90 lines of traceback, through the magics too
    from distributed import SpecCluster

    import jupyter_mesh as jm

    message = (rf"^config mesh\.{re.escape(key)} is missing: setting "
               rf"{re.escape(section)} as a whole replaces its other keys; set the keys "
               rf"one by one instead")
    with dask.config.set({section: value}):
        with pytest.raises(MeshConfigError, match=message):
            _config.get(key)
        with pytest.raises(KeyError):  # a key no setting has: the code's own mistake
            _config.get("fallback-timout")
        if section == "mesh.profile":  # refused before anything starts
            before = set(SpecCluster._instances)
            with pytest.raises(MeshConfigError, match=message):
                jm.Mesh.local(cpu=1, gpu=0, tpu=0, set_current=False)
            assert set(SpecCluster._instances) == before


def test_a_setting_that_does_not_exist_is_said_once(monkeypatch):
    # a typo in a key was ignored without a word
    import warnings

    monkeypatch.setattr(_config, "_warned", set())
    with dask.config.set({"mesh.fallback-timout": 4, "mesh.links.wan-bandwith": 1e9,
                          "mesh.fallback_timeout": 3, "mesh.zzz": 1}):
        assert sorted(_config.unknown_keys()) == [
            ("mesh.fallback-timout", "mesh.fallback-timeout"),
            ("mesh.links.wan-bandwith", "mesh.links.wan-bandwidth"), ("mesh.zzz", None)]
        with pytest.warns(UserWarning) as said:
            _config.warn_unknown_keys()
        texts = sorted(str(w.message) for w in said)
        assert texts == [
            "jupyter_mesh: config mesh.fallback-timout is no setting, and changes nothing: "
            "did you mean mesh.fallback-timeout?",
            "jupyter_mesh: config mesh.links.wan-bandwith is no setting, and changes "
            "nothing: did you mean mesh.links.wan-bandwidth?",
            "jupyter_mesh: config mesh.zzz is no setting, and changes nothing (the settings "
            "are in the README's table)"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _config.warn_unknown_keys()  # once
    assert _config.unknown_keys() == []  # the defaults: none
    # settings whose default is null (mesh.profile.cache-dir) included: that one made
    # the look for unknown keys start over from the top, for ever (RecursionError in
    # every Mesh.local)
    with dask.config.set({"mesh.profile.cache-dir": None, "mesh.local.host": None}):
        assert _config.unknown_keys() == []


def test_a_setting_that_does_not_exist_is_said_at_the_users_line(monkeypatch, ip):
    # under %mesh the warning named jupyter_mesh's magics.py, not the user's cell
    import warnings

    from IPython.core.error import UsageError

    monkeypatch.setattr(_config, "_warned", set())
    with dask.config.set({"mesh.progress-aftr": 10}), \
            warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(UsageError):  # (nothing listens there)
            ip.run_line_magic("mesh", "connect tcp://127.0.0.1:1 --timeout 1 --replace")
    (w,) = [w for w in said if "progress-aftr" in str(w.message)]
    assert w.filename == __file__, w.filename


def _frames(tmp_path):
    """A call chain through files named as jupyter_mesh's (Mesh.compute, the router)
    into a user's function that raises."""
    ns: dict = {}
    for path, code in [
        ("user.py", "def user():\n    raise KeyError('in the user function')\n"),
        ("jupyter_mesh/router/api.py", "def routed():\n    return user()\n"),
        ("jupyter_mesh/mesh.py", "def compute():\n    return routed()\n"),
        ("caller.py", "def caller():\n    return compute()\n"),
        ("jupyter_mesh/router/_device.py", "def ours():\n    raise KeyError('ours')\n"),
        ("jupyter_mesh/router/rewrite.py", "def via():\n    return ours()\n"),
    ]:
        exec(compile(code, str(tmp_path / path), "exec"), ns)
    return ns


def test_task_errors_leave_jupyter_mesh_frames_out_and_keep_the_users(tmp_path):
    import traceback

    from jupyter_mesh.errors import shorten_ours

    ns = _frames(tmp_path)
    names = lambda info: [f.name for f in traceback.extract_tb(info.tb)]  # noqa: E731

    def run(**kw):
        with shorten_ours(**kw):
            ns["caller"]()

    with pytest.raises(KeyError) as info:
        run()
    # the block's own frame (the first) and the user's stay; ours between them go
    assert names(info)[-3:] == ["run", "caller", "user"]
    with pytest.raises(KeyError) as info:
        run(drop_first=True)  # (the router's scheduler: the user's .compute() above)
    assert names(info)[-2:] == ["caller", "user"] and "run" not in names(info)
    # the last frame stays where it is ours: where jupyter_mesh itself raised
    with pytest.raises(KeyError, match="ours") as info, shorten_ours():
        ns["via"]()
    assert names(info)[-1] == "ours" and "via" not in names(info)
    # shortening turned off in Dask's config (an empty list): every frame stays
    with dask.config.set({"admin.traceback.shorten": []}), pytest.raises(KeyError) as info:
        run()
    assert names(info)[-4:] == ["caller", "compute", "routed", "user"]


def test_a_section_given_one_value_in_a_yaml_file_is_said(monkeypatch, tmp_path, no_mesh):
    # Dask merges this package's defaults over a section given a single value in a
    # YAML file (or a DASK_MESH... variable): it vanished, and the mesh started with the
    # defaults without a word
    (tmp_path / "mine.yaml").write_text("mesh:\n  local: 5\n")
    monkeypatch.setenv("DASK_CONFIG", str(tmp_path))
    monkeypatch.setattr(dask.config, "paths", [*dask.config.paths, str(tmp_path)])
    with pytest.raises(jm.MeshConfigError, match=(
            r"^config mesh\.local is a section of settings \(dashboard-address, host, "
            r"pin-jax, tls\), not 5 \(in a Dask YAML file or a DASK_ variable\): give it "
            r"one setting per line under it")):
        jm.Mesh.local(cpu=1, gpu=0, tpu=0, set_current=False)
    with pytest.raises(jm.MeshConfigError, match=r"^config mesh\.local is a section"):
        jm.Mesh.connect("tcp://127.0.0.1:1", set_current=False)


def test_env_var_overrides(monkeypatch):
    monkeypatch.setenv("DASK_MESH__CONNECT_TIMEOUT", "3")
    dask.config.refresh()
    try:
        assert _config.get_seconds("connect-timeout") == 3
    finally:
        monkeypatch.delenv("DASK_MESH__CONNECT_TIMEOUT")
        dask.config.refresh()


@pytest.mark.parametrize("key, unit", [
    ("pcie-bandwidth", "bytes per second"), ("pcie-latency", "seconds"),
    ("network-bandwidth", "bytes per second"), ("wan-bandwidth", "bytes per second"),
    ("wan-latency", "seconds"),
])
@pytest.mark.parametrize("bad", ["fast", 0, -2])
def test_bad_link_figures_name_the_key_and_its_unit(key, unit, bad):
    from jupyter_mesh.router.cost import Links

    with dask.config.set({f"mesh.links.{key}": bad}):
        with pytest.raises(MeshConfigError, match=rf"mesh\.links\.{key} must be a .*{unit}"):
            Links.from_config()
    assert Links.from_config().network_bandwidth > 0  # the defaults again


def test_network_bandwidth_auto_is_the_default_and_stands_in_for_a_figure():
    from jupyter_mesh.router.calibrate import DEFAULT_NETWORK_BANDWIDTH
    from jupyter_mesh.router.cost import Links, network_bandwidth_auto

    assert network_bandwidth_auto()  # measured on a live mesh (see calibrate)
    assert Links.from_config().network_bandwidth == DEFAULT_NETWORK_BANDWIDTH
    with dask.config.set({"mesh.links.network-bandwidth": 3e8}):
        assert not network_bandwidth_auto()
        assert Links.from_config().network_bandwidth == 3e8


@pytest.mark.parametrize("bad", [-5, 2.7, True, "many", [1]])
def test_layer_plan_threshold_must_be_a_whole_number_of_tasks(bad):
    from jupyter_mesh.router.layers import layer_plan_threshold

    with dask.config.set({"mesh.router.layer-plan-threshold": bad}):
        with pytest.raises(MeshConfigError) as info:
            layer_plan_threshold()
    assert str(info.value) == (f"config mesh.router.layer-plan-threshold must be a whole "
                               f"number of tasks >= 0, not {bad!r}")
    assert layer_plan_threshold() == 20_000  # the default again


@pytest.mark.parametrize("good, expected", [(0, 0), (5, 5), ("30", 30), (2.0e4, 20_000),
                                            (None, 20_000)])
def test_layer_plan_threshold_takes_whole_numbers(good, expected):
    from jupyter_mesh.router.layers import layer_plan_threshold

    with dask.config.set({"mesh.router.layer-plan-threshold": good}):
        assert layer_plan_threshold() == expected


# every seconds-valued key, read as the code that uses it reads it
SECONDS_KEYS = [
    ("connect-timeout", False),         # Mesh.connect, Mesh.inventory
    ("fallback-timeout", True),         # the router's fallback, route=off waits
    ("remote.connect-timeout", False),  # remote cells
    ("remote.interrupt-grace", True),   # remote cells
    ("remote.worker-wait", True),
    ("profile.measure-seconds", True),
]


@pytest.mark.parametrize("key, allow_zero", SECONDS_KEYS)
@pytest.mark.parametrize("bad", [-1, "soon", None, float("nan"), True, "", [2]])
def test_bad_seconds_of_every_key_are_one_line_naming_it(key, allow_zero, bad):
    with dask.config.set({f"mesh.{key}": bad}):
        with pytest.raises(MeshConfigError) as info:
            _config.get_seconds(key, allow_zero=allow_zero)
    message = str(info.value)
    assert message.startswith(f"config mesh.{key} must be a ") and "\n" not in message
    assert message.endswith(f"number of seconds, not {bad!r}")


@pytest.mark.parametrize("key", sorted(_config.DAY_AT_MOST))
@pytest.mark.parametrize("bad", [float("inf"), 1e300, 86401])
def test_a_time_longer_than_a_day_is_refused(key, bad):
    # a fallback-timeout of inf left a computation waiting for ever on a lost kind; a
    # latency of 1e300 s made every estimate infinite
    assert key in _config.WAITS or key in TIMES_READ
    with dask.config.set({f"mesh.{key}": bad}):
        with pytest.raises(MeshConfigError, match=rf"^config mesh\.{key} must be at most "
                                                  rf"86400 s \(a day\), not {re.escape(repr(bad))}$"):
            TIMES_READ.get(key, lambda: _config.get_seconds(key))()
    with dask.config.set({f"mesh.{key}": 86400}):
        TIMES_READ.get(key, lambda: _config.get_seconds(key))()  # a day is taken


def _links():
    from jupyter_mesh.router.cost import Links

    return Links.from_config()


def _cost(name):
    from jupyter_mesh.router import cost

    return lambda: getattr(cost, name)()


#: the times outside the waits, each read as the code that uses it reads it
TIMES_READ = {
    "links.pcie-latency": _links,
    "links.network-latency": _links,
    "links.wan-latency": _links,
    "task-overhead": _cost("configured_task_overhead"),
    "dependency-latency": _cost("configured_dependency_latency"),
    "profile.measure-seconds": lambda: _config.get_seconds("profile.measure-seconds"),
}


@pytest.mark.parametrize("key", ["pcie-bandwidth", "network-bandwidth", "wan-bandwidth"])
@pytest.mark.parametrize("bad", [float("inf"), 1e300, 2e15])
def test_a_bandwidth_beyond_a_petabyte_per_second_is_refused(key, bad):
    from jupyter_mesh.router.cost import Links

    with dask.config.set({f"mesh.links.{key}": bad}):
        with pytest.raises(MeshConfigError) as info:
            Links.from_config()
    assert str(info.value) == (f"config mesh.links.{key} must be at most 1e+15 bytes per "
                               f"second (a petabyte per second), not {bad!r}")
    with dask.config.set({f"mesh.links.{key}": 1e15}):
        assert Links.from_config()  # the most it takes


def test_progress_after_may_be_infinite():
    # ".inf" in YAML: no progress bar at all
    with dask.config.set({"mesh.progress-after": float("inf")}):
        assert _config.get_seconds("progress-after") == float("inf")


@pytest.mark.parametrize("key", [k for k, allow_zero in SECONDS_KEYS if not allow_zero])
def test_timeouts_of_zero_are_refused(key):
    with dask.config.set({f"mesh.{key}": 0}):
        with pytest.raises(MeshConfigError, match=rf"^config mesh\.{key} must be a positive "
                                                  rf"number of seconds, not 0$"):
            _config.get_seconds(key, allow_zero=False)


@pytest.mark.parametrize("bad", [-1, "soon", None, 0])
def test_a_bad_connect_timeout_is_said_before_connecting(no_mesh, bad):
    import jupyter_mesh as jm

    with dask.config.set({"mesh.connect-timeout": bad}):
        with pytest.raises(MeshConfigError, match=rf"^config mesh\.connect-timeout must be "
                                                  rf"a .*number of seconds, not {bad!r}$"):
            jm.Mesh.connect("tcp://127.0.0.1:9")


@pytest.mark.parametrize("bad", [1e6, float("inf")])
def test_too_long_a_connect_timeout_in_config_names_the_key(no_mesh, bad):
    import jupyter_mesh as jm

    with dask.config.set({"mesh.connect-timeout": bad}):
        with pytest.raises(MeshConfigError, match=r"^config mesh\.connect-timeout must be "
                                                  r"at most 86400 s \(a day\), not "):
            jm.Mesh.connect("tcp://127.0.0.1:9")


@pytest.mark.parametrize("bad", [None, "", "  ", 127, "127.0.0.1 ", "tcp://127.0.0.1"])
def test_local_host_must_be_an_interface(bad):
    with dask.config.set({"mesh.local.host": bad}):
        with pytest.raises(MeshConfigError) as info:
            _config.get_host()
    assert str(info.value) == (f"config mesh.local.host must be an interface address like "
                               f"'127.0.0.1' (this machine only), not {bad!r}")


def test_a_local_host_that_is_no_valid_name_names_the_key(ip):
    # a label empty or too long: IDNA's UnicodeError, a traceback from Python and "the
    # mesh did not start" from the magic
    from IPython.core.error import UsageError

    import jupyter_mesh as jm

    want = ("config mesh.local.host bad..host is not an address of this machine (not a "
            "valid host name): give one of its interface addresses (127.0.0.1 for this "
            "machine only)")
    with dask.config.set({"mesh.local.host": "bad..host"}):
        with pytest.raises(MeshConfigError) as info:
            jm.Mesh.local(cpu=1, gpu=0, tpu=0)
        assert str(info.value) == want
        with pytest.raises(UsageError) as info:
            ip.run_line_magic("mesh", "start --cpu 1 --gpu 0 --tpu 0")
        assert str(info.value) == want


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:0", {"dashboard_address": "127.0.0.1:0"}),
    ("127.0.0.1:8787", {"dashboard_address": "127.0.0.1:8787"}),
    # no host: the interface the mesh listens on, not Dask's every interface
    (":0", {"dashboard_address": "10.1.2.3:0"}),
    (8787, {"dashboard_address": "10.1.2.3:8787"}),
    ("8787", {"dashboard_address": "10.1.2.3:8787"}),
    ("0.0.0.0:8787", {"dashboard_address": "0.0.0.0:8787"}),  # asked for
    # IPv6: the pair (Dask splits a text address at every ":")
    ("[::1]:0", {"dashboard_address": ("::1", 0)}),
    (None, {"dashboard": False, "dashboard_address": "10.1.2.3:0"}),
    (False, {"dashboard": False, "dashboard_address": "10.1.2.3:0"}),
])
def test_dashboard_address_values(value, expected):
    with dask.config.set({"mesh.local.dashboard-address": value}):
        assert _config.dashboard_options("10.1.2.3") == expected


def test_a_dashboard_on_an_ipv6_mesh_host_is_given_to_dask_as_a_pair():
    with dask.config.set({"mesh.local.dashboard-address": ":0"}):
        assert _config.dashboard_options("::1") == {"dashboard_address": ("::1", 0)}
    with dask.config.set({"mesh.local.dashboard-address": None}):
        assert _config.dashboard_options("::1") == {"dashboard": False,
                                                    "dashboard_address": ("::1", 0)}


@pytest.mark.parametrize("bad", ["", "dashboard", "host:port", "127.0.0.1:99999", ":-1",
                                 "http://127.0.0.1:8787", True, 2.5, ["a"], "a b:1"])
def test_bad_dashboard_address_is_one_line(bad):
    with dask.config.set({"mesh.local.dashboard-address": bad}):
        with pytest.raises(MeshConfigError) as info:
            _config.dashboard_options("127.0.0.1")
    message = str(info.value)
    assert message.startswith("config mesh.local.dashboard-address must be HOST:PORT like "
                              "'127.0.0.1:8787'") and "\n" not in message
    assert message.endswith(f"not {bad!r}")


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (" AUTO ", "auto"),
                                             (True, True), (False, False)])
def test_pin_jax_values(value, expected):
    with dask.config.set({"mesh.local.pin-jax": value}):
        assert _config.pin_jax() == expected


@pytest.mark.parametrize("bad", ["yes", "", 1, None, ["auto"]])
def test_a_bad_pin_jax_is_one_line_and_starts_nothing(no_mesh, bad):
    import jupyter_mesh as jm

    with dask.config.set({"mesh.local.pin-jax": bad}):
        with pytest.raises(MeshConfigError) as info:
            jm.Mesh.local(cpu=1, jax_cpu=1, gpu=0, tpu=0)
    assert str(info.value) == (f"config mesh.local.pin-jax must be true, false or auto, "
                               f"not {bad!r}")
    assert _state.active() is None


@pytest.mark.parametrize("key, bad", [("connect-timeout", "abc"), ("fallback-timeout", -1),
                                      ("fallback-timeout", float("inf"))])
def test_a_bad_timeout_is_said_before_a_local_mesh_starts(no_mesh, key, bad):
    # it started, and the first inventory (or the first routed computation) said it
    import jupyter_mesh as jm

    with dask.config.set({f"mesh.{key}": bad}):
        with pytest.raises(MeshConfigError, match=rf"^config mesh\.{key} must be "):
            jm.Mesh.local(cpu=1, gpu=0, tpu=0)
    assert _state.active() is None


@pytest.mark.parametrize("value", [".inf", ".Inf", "+.INF", "inf"])
def test_yamls_infinity_is_taken_from_a_variable_too(monkeypatch, value):
    # README: progress-after ".inf" means never; from a variable it came as a string
    monkeypatch.setenv("DASK_MESH__PROGRESS_AFTER", value)
    dask.config.refresh()
    try:
        assert _config.get_seconds("progress-after") == float("inf")
    finally:
        monkeypatch.delenv("DASK_MESH__PROGRESS_AFTER")
        dask.config.refresh()
