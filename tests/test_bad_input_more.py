"""`python -m jupyter_mesh.demo`: a notebook that cannot run to its end is one line."""

from __future__ import annotations

import nbformat

from jupyter_mesh import demo


def _notebook(tmp_path, source):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    path = tmp_path / "demo.ipynb"
    nbformat.write(nb, str(path))
    return path


def _one_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("jupyter_mesh.demo: ") and err.count("\n") == 1, err
    return err


def test_demo_a_cell_past_the_timeout_is_one_line(tmp_path, capsys):
    path = _notebook(tmp_path, "import time; time.sleep(120)")
    assert demo.run(str(path), timeout=2) == 1
    err = _one_line(capsys)
    assert f"a cell of {path} ran longer than 2 s and was stopped: run the notebook" in err


def test_demo_a_missing_kernel_is_one_line(tmp_path, capsys, monkeypatch):
    import signal

    monkeypatch.setattr(demo, "KERNEL", "no-such-kernel-for-jupyter-mesh")
    before = signal.getsignal(signal.SIGINT)
    assert demo.main([str(_notebook(tmp_path, "x = 1"))]) == 1
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C still works here
    err = _one_line(capsys)
    assert ("no no-such-kernel-for-jupyter-mesh kernel is installed for Jupyter: install "
            "one with python -m ipykernel install --user") in err


def test_demo_a_dead_kernel_is_one_line(tmp_path, capsys, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    def dies(self, **kwargs):
        raise DeadKernelError("Kernel died\nmore detail")

    monkeypatch.setattr(NotebookClient, "execute", dies)
    path = _notebook(tmp_path, "x = 1")
    assert demo.main([str(path)]) == 1
    err = _one_line(capsys)
    assert f"the kernel died while running {path} (Kernel died): it may have run out" in err

