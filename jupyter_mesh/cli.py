"""jupyter-mesh: command-line entry points of jupyter_mesh.

    jupyter-mesh worker SCHEDULER_ADDRESS [--site NAME] [--jax] [--nthreads N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any, NoReturn

from .errors import MeshError


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line that says where the options are (argparse
    prints its whole usage first)."""

    #: subcommand -> its parser (an unknown option is said by the subcommand's)
    subcommands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}: see {self.prog} --help\n")


def _parser() -> _Parser:
    from ._version import __version__

    # options are spelt out (as the magics take them): an abbreviation given beside the
    # whole option would slip past the check for an option given twice
    parser = _Parser(prog="jupyter-mesh", description=__doc__.splitlines()[0],
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"jupyter-mesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="start a mesh worker that joins a Dask scheduler",
                       allow_abbrev=False)
    parser.subcommands = {"worker": w}
    w.add_argument("address", help="scheduler address, tcp://HOST:PORT or tls://HOST:PORT")
    w.add_argument("--site", default="default", help="site label of this worker (default: default)")
    w.add_argument("--jax", action="store_true",
                   help="drive the device with JAX: a TPU, else a GPU (jax[cuda12]), else "
                        "the CPU")
    w.add_argument("--backend", default=None, metavar="NAME",
                   help="drive the device with this backend: numpy, cupy, jax, or one "
                        "installed through the jupyter_mesh.backends entry-point group")
    w.add_argument("--gpu", type=int, default=None, metavar="INDEX",
                   help="drive CUDA GPU INDEX through CuPy (pinned with CUDA_VISIBLE_DEVICES)")
    w.add_argument("--tpu", type=int, default=None, metavar="INDEX",
                   help="drive TPU chip INDEX through JAX (pinned with TPU_VISIBLE_CHIPS), "
                        "so each chip of a TPU host can be a worker of its own")
    w.add_argument("--nthreads", type=int, default=None, help="threads (default: all cores; 1 for a GPU or TPU worker; at most "
                        "four per core)")
    w.add_argument("--name", default=None, help="worker name")
    w.add_argument("--host", default=None,
                   help="interface to listen on (default: the one that reaches the "
                        "scheduler; loopback for a scheduler at a loopback address)")
    w.add_argument("--memory-limit", default="auto",
                   help="memory limit, as Dask's: bytes, '4 GiB', a fraction of the host's "
                        "memory, or auto (the default: the host's memory over its GPUs or "
                        "TPU chips for such a worker, else Dask's share)")
    w.add_argument("--tls-ca-file", default=None, metavar="FILE",
                   help="for a tls:// scheduler: the CA certificate (PEM)")
    w.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="this worker's certificate (PEM)")
    w.add_argument("--tls-key", default=None, metavar="FILE",
                   help="this worker's private key (PEM)")
    return parser


async def run_worker(args: argparse.Namespace) -> int:
    from distributed import Nanny
    from distributed.security import Security

    from .devices._detect import cpu_cores
    from .devices._worker_plugin import MeshWorkerPlugin
    from .mesh import (
        _secure_form,
        check_address,
        check_memory_limit,
        check_site,
        check_tls_files,
        is_encrypted,
        worker_memory,
    )

    address = check_address(args.address)
    site = check_site(args.site)
    most = 4 * cpu_cores()
    if args.nthreads is not None and not 1 <= args.nthreads <= most:
        raise MeshError(f"--nthreads must be a whole number from 1 to {most} (four per core "
                        f"here), not {args.nthreads}")
    if args.name is not None and not args.name.strip():
        raise MeshError("--name must not be blank: give a name, or leave out --name for "
                        "Dask's own")
    try:
        # only checked: Dask reads the text itself ("0.5" is half the memory)
        check_memory_limit(args.memory_limit)
    except MeshError as exc:
        raise MeshError(f"--memory-limit: {exc}") from None
    security = None
    tls = (args.tls_ca_file, args.tls_cert, args.tls_key)
    for option, path in zip(("--tls-ca-file", "--tls-cert", "--tls-key"), tls, strict=True):
        if path is not None and not path.strip():
            # (a shell variable that was not set): never plain TCP in its place
            raise MeshError(f"{option} is empty: give the path of a PEM file")
    if any(tls) and not is_encrypted(address):
        raise MeshError(f"{address} is not a TLS address, but TLS files were given: use "
                        f"{_secure_form(address)}, or leave out the TLS files")
    if any(tls) or is_encrypted(address):
        if not all(tls):
            raise MeshError("a tls:// scheduler needs --tls-ca-file, --tls-cert and --tls-key")
        check_tls_files(args.tls_ca_file, args.tls_cert, args.tls_key)
        security = Security(tls_ca_file=args.tls_ca_file, tls_worker_cert=args.tls_cert,
                            tls_worker_key=args.tls_key, require_encryption=True)
    env = {}
    kind = None
    #: accelerators of their kind on this host, where this worker drives one of them
    accelerators = 0
    backend = "jax" if args.jax else None
    if args.backend is not None:
        from .router.backends import backend_names, get_backend

        if args.jax and args.backend != "jax":
            raise MeshError(f"--jax and --backend {args.backend} disagree: give one of them")
        try:
            plugin = get_backend(args.backend)
        except MeshError:
            from .router.backends import broken_backends

            if args.backend in broken_backends():  # installed, but broken: why
                raise
            raise MeshError(f"unknown backend {args.backend!r}: installed are "
                            f"{', '.join(backend_names())} (a backend package adds its own "
                            f"through the jupyter_mesh.backends entry-point group)") from None
        backend = plugin.name
        if backend == "cupy":
            kind = "gpu"
            if args.gpu is None:
                from .devices._detect import cuda_devices, cuda_why_none

                if not cuda_devices():
                    raise MeshError(f"--backend cupy drives a CUDA GPU, and there is none "
                                    f"here ({cuda_why_none()}): leave out --backend to "
                                    f"join as a CPU worker")
    if args.gpu is not None:
        from .devices._detect import cuda_devices, cuda_why_none

        found = len(cuda_devices())
        if args.gpu < 0 or args.gpu >= found:
            gpu_why = cuda_why_none() if not found else f"CuPy sees {found}"
            raise MeshError(
                f"no CUDA GPU {args.gpu} here ({gpu_why}): leave out --gpu to "
                f"join as a CPU worker{'' if args.jax else ', or use --jax for a TPU'}"
            )
        from .mesh import visible_gpu

        # the index counts the GPUs this process sees (CUDA_VISIBLE_DEVICES, if set)
        env["CUDA_VISIBLE_DEVICES"] = visible_gpu(args.gpu)
        kind = "gpu"
        accelerators = found
    if args.tpu is not None:
        from .devices import _tpu

        if args.gpu is not None or backend not in (None, "jax"):
            raise MeshError("--tpu drives a TPU chip through JAX: leave out --gpu and "
                            "--backend")
        tpus, why = _tpu.chips()
        if args.tpu < 0 or args.tpu >= len(tpus):
            raise MeshError(
                f"no TPU chip {args.tpu} here (this host has {len(tpus)}"
                f"{f': {why}' if why else ''}): leave out --tpu to join as a CPU worker"
            )
        env.update(_tpu.worker_env(args.tpu), JAX_PLATFORMS="tpu")
        kind, backend = "tpu", "jax"
        accelerators = len(tpus)
    if backend == "jax":
        # 64-bit on, unless the environment turns it off (as for dask worker's preload)
        env["JAX_ENABLE_X64"] = os.environ.get("JAX_ENABLE_X64", "1")
    if kind is None and backend in (None, "jax"):
        # without --gpu/--tpu the worker detects its device (JAX takes a TPU before the
        # CPU): one of a GPU or TPU gets one thread and its share of the host's memory,
        # as with --gpu or --tpu
        found = _detects_accelerator(jax=backend == "jax")
        if found:
            accelerators = found
    kind_threads = 1 if kind in ("gpu", "tpu") or accelerators else cpu_cores()
    nthreads = args.nthreads or kind_threads
    # what the worker process reads as it starts, said here in one line (there, it
    # failed with pages of Dask's tracebacks)
    from . import _config
    from .devices import _profile

    _config.check_sections()
    _profile.check_config()
    for message in _config.unknown_key_messages():
        print(f"jupyter-mesh worker: {message}", file=sys.stderr, flush=True)
    _connect_timeout()
    if backend not in (None, "numpy", "cupy", "jax"):
        _try_plugin(backend, kind, env)
    host = listen_host(address, args.host)
    if security is None and not _loopback(host):
        print(f"jupyter-mesh worker: warning: this worker listens on {host} with plain "
              f"tcp://: anyone who reaches it there can run code on it; use tls:// with "
              f"--tls-ca-file, --tls-cert and --tls-key", file=sys.stderr, flush=True)
    nanny = Nanny(
        address,
        nthreads=nthreads,
        name=args.name,
        host=host,
        # "auto" for a worker of one GPU or TPU chip: the host's memory over its chips
        # (Dask's own "auto" gives one thread's share of the cores: a sixteenth of a
        # 16-core host), as each of the host's chips gets a worker of its own
        memory_limit=worker_memory(args.memory_limit, accelerators) if accelerators
        else args.memory_limit,
        security=security,
        env=env,
        plugins=[MeshWorkerPlugin(site=site, kind=kind, backend=backend)],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            return
        # a second Ctrl-C while the worker closes: stop now (the nanny's worker process
        # exits with it, as Dask's child processes do when their parent is gone)
        print("jupyter-mesh worker: stopped at once (a second Ctrl-C); the worker did "
              "not close cleanly", file=sys.stderr, flush=True)
        os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    waiter = asyncio.ensure_future(stop.wait())
    print(f"jupyter-mesh worker: joining {address} (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    # Ctrl-C (or SIGTERM) stops the join too: Dask waits up to its connect timeout
    joining = asyncio.ensure_future(_join(nanny, address, security, args.name))
    await asyncio.wait([joining, waiter], return_when=asyncio.FIRST_COMPLETED)
    if not joining.done():
        joining.cancel()
        with contextlib.suppress(BaseException):
            await joining
        with contextlib.suppress(Exception):
            await nanny.close()
        print(f"jupyter-mesh worker: stopped before it joined {address}", file=sys.stderr,
              flush=True)
        return 130
    joining.result()  # an error starting: main() says it
    print(f"jupyter-mesh worker joined {address} (site {site})", flush=True)
    finished = asyncio.ensure_future(nanny.finished())
    await asyncio.wait([finished, waiter], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        print("jupyter-mesh worker: closing (Ctrl-C again stops at once)", file=sys.stderr,
              flush=True)
    await nanny.close()
    if not stop.is_set():  # it ended by itself: the scheduler closed or went away
        print(f"jupyter-mesh worker: left {address}: the worker ended (the scheduler "
              f"closed, went away, or removed it)", file=sys.stderr, flush=True)
        return 1
    return 0


def _try_plugin(backend: str, kind: str | None, env: dict[str, str]) -> None:
    """Run a backend plugin's own code (available, model, measure) before the worker
    starts, in a short child process with the worker's environment, so that what fails
    is one line here (in the worker it was a page of Dask's tracebacks) and this
    process, which hosts the nanny for the worker's life, never opens the device; the
    profile it measures is cached for the worker."""
    import subprocess

    from . import _config

    code = ("import sys\n"
            "from jupyter_mesh.errors import MeshError\n"
            "from jupyter_mesh.devices._worker_plugin import describe_device\n"
            "try:\n"
            f"    describe_device({kind!r}, {backend!r}, None)\n"
            "except MeshError as exc:\n"
            "    print(str(exc).removeprefix('jupyter_mesh: '))\n"
            "    sys.exit(3)\n")
    wait = 120 + 4 * _config.get_seconds("profile.measure-seconds")
    try:
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=wait)
    except subprocess.TimeoutExpired:
        raise MeshError(f"backend {backend!r} did not say within {wait:g} s whether it can "
                        f"drive this worker (its available(), model() or measure() hangs)"
                        ) from None
    if done.returncode == 3:
        raise MeshError(done.stdout.strip().splitlines()[-1])
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise MeshError(f"backend {backend!r} cannot drive this worker: trying it failed "
                        f"({why})")


_NAME_TAKEN = ("a worker of that scheduler has the name {name!r} already: give another "
               "--name, or leave it out")


class CouldNotJoin(MeshError):
    """No Dask scheduler answers at the address (said in one line, exit status 1)."""


async def _join(nanny: Any, address: str, security: Any, name: str | None = None) -> None:
    """Start ``nanny`` once a Dask scheduler answers at ``address``. Dask's own join
    waits for ever on a port that accepts connections and never speaks Dask (a
    dashboard's, another server's), and retries a refused one until its timeout."""
    from .mesh import (
        _a_scheduler,
        _check_listening,
        _could_not_connect,
        _identity,
        _Unreachable,
    )

    timeout = _connect_timeout()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    said = False
    try:
        while True:
            try:
                await asyncio.to_thread(_check_listening, address, timeout)
                break
            except _Unreachable as exc:
                # a refused port: the scheduler may be starting too (a job script, a
                # compose file), so it is tried again until the connect timeout, as
                # Dask does; a host name that does not resolve fails at once
                if "connection refused" not in str(exc) or loop.time() + 0.5 > deadline:
                    raise
                if not said:
                    print(f"jupyter-mesh worker: nothing listens at {address} yet; trying "
                          f"again for up to {timeout:g} s (distributed.comm.timeouts."
                          f"connect)", file=sys.stderr, flush=True)
                    said = True
                await asyncio.sleep(0.5)
        ident = _a_scheduler(await asyncio.wait_for(
            _identity(address, security, timeout, "worker"), timeout))
    except (OSError, asyncio.TimeoutError) as exc:
        told = str(_could_not_connect(address, timeout, exc))
        if not told.startswith("could not connect"):  # what TLS said, in its words
            raise CouldNotJoin(told) from None
        why = (str(exc).splitlines() or [""])[0] or \
            f"no Dask scheduler answered within {timeout:g} s"
        raise CouldNotJoin(f"could not join {address}: {why}: check that a Dask scheduler "
                           f"listens there, this host can reach it, and the protocol "
                           f"(tcp/tls) is right") from None
    if name is not None and name in [w.get("name") for w in
                                     (ident.get("workers") or {}).values()]:
        # (said before the worker starts: the scheduler's refusal came as a page of
        # Dask's tracebacks first)
        raise CouldNotJoin(_NAME_TAKEN.format(name=name))
    await nanny.start()


def _connect_timeout() -> float:
    """Dask's ``distributed.comm.timeouts.connect`` in seconds, or a MeshError naming it."""
    import math

    import dask
    from dask.utils import parse_timedelta

    value = dask.config.get("distributed.comm.timeouts.connect")
    try:
        seconds = float(parse_timedelta(value, default="seconds"))
    except (TypeError, ValueError, KeyError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise MeshError(f"config distributed.comm.timeouts.connect must be a time like "
                        f"'30s', not {value!r}")
    return seconds


def listen_host(address: str, host: str | None) -> str:
    """The interface a worker listens on: ``host`` if given, else the one this machine
    reaches the scheduler through (loopback for a scheduler at a loopback address), never
    every interface (Dask's own default for a worker)."""
    from ._config import is_host

    if host is not None:
        if not is_host(host):
            raise MeshError(f"--host must be an interface address like 127.0.0.1 or "
                            f"10.0.0.5 (0.0.0.0 for every interface), not {host!r}")
        from .mesh import bracketed, check_own_host

        check_own_host(host, "--host")
        return bracketed(host)
    from distributed.comm import get_address_host
    from distributed.utils import get_ip

    scheduler_host = get_address_host(address)
    import socket

    try:
        socket.getaddrinfo(scheduler_host.strip("[]"), None)
    except (socket.gaierror, UnicodeError) as exc:
        # (before looking for the interface that reaches it, which was said instead)
        if getattr(exc, "errno", None) == socket.EAI_AGAIN:
            raise CouldNotJoin(f"could not join {address}: the name {scheduler_host!r} "
                               f"could not be looked up now (DNS did not answer): try "
                               f"again, or give the scheduler's IP address") from None
        raise CouldNotJoin(f"could not join {address}: host {scheduler_host!r} not found: "
                           f"check the scheduler's address") from None
    if _loopback(scheduler_host):
        return "127.0.0.1" if ":" not in scheduler_host else "[::1]"
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dask warns, then guesses 127.0.0.1
            found = get_ip(scheduler_host)
    except Exception:
        found = None
    if not found or _loopback(found):
        # no route to it from here: a worker on loopback would never be reached
        raise MeshError(f"cannot find the interface of this machine that reaches "
                        f"{scheduler_host}: give --host ADDRESS (this machine's address "
                        f"that the scheduler can reach)")
    return found


def _loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _detects_accelerator(jax: bool = False) -> int:
    """How many accelerators of the kind a worker started without --gpu/--tpu will
    drive one of: the CUDA GPUs CuPy sees, else the TPU chips (counted in a child
    process, so that this one never holds a chip); 0 where it will drive the CPU.
    ``jax``: the worker drives whatever JAX sees (``--jax``): a TPU, else a GPU through
    JAX's CUDA plugin (counted in a child process too), else the CPU."""
    from .devices import _detect, _tpu

    if not jax and _detect.cuda_available():
        return len(_detect.cuda_devices())
    chips = len(_tpu.chips()[0]) if _detect.tpu_possible() else 0
    if chips or not jax:
        return chips
    return _detect.jax_gpu_count()


def _given_twice(sub: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first option of ``sub`` that ``argv`` gives more than once (argparse keeps
    the last and drops the others without a word), or None."""
    seen: set[str] = set()
    for arg in argv:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        action = sub._option_string_actions.get(name)
        if action is None or action.dest in ("help",):
            continue
        if action.dest in seen:
            return name
        seen.add(action.dest)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        # (argparse would say only that the command is missing)
        parser.error(f"unrecognized arguments: {argv[0]} (options go after the command: "
                     f"jupyter-mesh worker ADDRESS [options])")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand, whose --help lists its options
        parser.subcommands[args.command].error(
            f"unrecognized arguments: {' '.join(unknown)}")
    twice = _given_twice(parser.subcommands[args.command], argv[1:])
    if twice is not None:
        parser.subcommands[args.command].error(f"{twice} given twice: give it once")
    try:
        # (inside: a Ctrl-C while distributed's modules load is said as one too)
        logging.basicConfig(level=logging.WARNING)
        from .devices._worker_plugin import quiet_name_taken

        quiet_name_taken()  # the refusal is said in one line below
        if args.command == "worker":
            return asyncio.run(run_worker(args))
    except CouldNotJoin as exc:
        print(f"jupyter-mesh: {exc}", file=sys.stderr)
        return 1
    except MeshError as exc:
        print(f"jupyter-mesh: {str(exc).removeprefix('jupyter_mesh: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the worker's own handler was in place
        print("jupyter-mesh worker: stopped before it started", file=sys.stderr)
        return 130
    except Exception as exc:
        # Dask's Nanny says "Nanny failed to start." over the error that says why
        # (the first OSError says why it could not join: what is under it, a timeout
        # or a cancelled wait, says less)
        chain: list[BaseException] = [exc]
        while chain[-1].__cause__ is not None:
            chain.append(chain[-1].__cause__)
        cause = next((e for e in chain if isinstance(e, OSError)), chain[-1])
        why = (str(cause).splitlines() or [type(cause).__name__])[0] or \
            type(cause).__name__
        if "name taken" in why:  # the scheduler refused the worker's name (a race)
            print(f"jupyter-mesh: {_NAME_TAKEN.format(name=args.name)}", file=sys.stderr)
            return 1
        if isinstance(cause, OSError):
            print(f"jupyter-mesh: could not join {args.address}: {why}: check that a Dask "
                  f"scheduler listens there, this host can reach it, and the protocol "
                  f"(tcp/tls) is right", file=sys.stderr)
        else:
            print(f"jupyter-mesh: the worker could not start: {why}", file=sys.stderr)
        return 1
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
