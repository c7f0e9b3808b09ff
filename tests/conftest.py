from __future__ import annotations

import os
import socket
import tempfile
import threading

import pytest

# Profiles measured by test workers go to a private cache, never the user's.
os.environ.setdefault(
    "DASK_MESH__PROFILE__CACHE_DIR", tempfile.mkdtemp(prefix="jupyter-mesh-test-profiles-")
)


def pytest_collection_modifyitems(config, items):
    try:
        import cupy

        has_gpu = bool(cupy.is_available())
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU usable by CuPy on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_mesh():
    """Make sure no mesh is active before and after a test."""
    from jupyter_mesh import _state

    active = _state.active()
    if active is not None:
        active.close()
    yield
    active = _state.active()
    if active is not None:
        active.close()


@pytest.fixture(scope="session")
def ip():
    """One IPython shell for the whole session, with the extension loaded.

    IPython's test shell is a singleton: ``start_ipython()`` returns it only once.
    """
    from IPython.core.getipython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython() or get_ipython()
    shell.run_line_magic("load_ext", "jupyter_mesh")
    return shell


@pytest.fixture
def fresh(mesh, ip):
    """The module's ``mesh`` as the current one, with no remote namespaces and no
    sticky workers (for remote-cell tests)."""
    from jupyter_mesh import _state

    _state.set_current(mesh)
    mesh.reset_remote()
    yield mesh


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never speaks Dask."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()
