"""Joining a running Ray cluster from a driver: address checks, token auth, and a watch on the head.

Ray (2.52+) protects a cluster with a token when its head runs with ``RAY_AUTH_MODE=token``;
``ray start --head`` turns it on by itself when ``~/.ray/auth_token`` exists on the head. A driver
joining by an explicit address sends the token only if ``RAY_AUTH_MODE=token`` was set when it
imported Ray, and reads it, in Ray's order, from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``
(https://docs.ray.io/en/latest/ray-security/token-auth.html). :func:`prepare_auth` (before
``import ray``) turns token mode on when a token is there; a head without auth accepts such a
driver too. :func:`join` asks the head once, with ``ray status`` in a child process under a short
timeout, whether it takes this driver, and turns each way of failing into one line
(:class:`UsageError`) instead of Ray's 20 s of retries.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from trainers.cli import UsageError

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN = Path("~/.ray/auth_token")
HEAD_LOST_EXIT = 1            # exit code of a driver whose cluster went away mid-run
GET_TOKEN = "`ray get-auth-token` on the head prints it"

# `ray status --address A` in a child process: Ray's exception types become exit codes
PROBE = """\
import sys
from ray.exceptions import AuthenticationError
from ray.scripts.scripts import status
try:
    status.main(["--address", sys.argv[1]], standalone_mode=False)
except AuthenticationError:
    sys.exit(3)
except ConnectionError:   # raised only while resolving "auto"
    sys.exit(4)
"""
REFUSED, NOT_FOUND = 3, 4


def split_address(address: str) -> tuple[str, str, int]:
    """``host:port`` or ``ray://host:port`` -> (scheme, host, port); UsageError otherwise."""
    scheme, _, hostport = address.rpartition("://")
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if scheme not in ("", "ray") or not sep or not port.isdigit() or not host:
        raise UsageError(f"--address must be host:port, ray://host:port or auto, got {address!r}")
    return scheme, host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when nothing listens at the address (ray.init would retry for
    long and end in a traceback)."""
    if address == "auto":
        return
    scheme, host, port = split_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        why = err.strerror or err
        if scheme == "ray":
            raise UsageError(f"--address {address}: no Ray Client server answers there ({why}); start the "
                             f"head with `ray start --head --ray-client-server-port {port}`, or give the "
                             "head's host:port (its GCS port, 6379 unless --port was given) instead") from None
        raise UsageError(f"--address {address}: no Ray cluster answers there ({why}); start one with "
                         "`ray start --head` or leave --address out for a local Ray") from None


def token_source() -> str | None:
    """Where Ray will read this driver's auth token from, in Ray's order; None when nowhere."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError:
            token = ""
        if not token:   # Ray aborts the process on this; say it first
            raise UsageError(f"{TOKEN_PATH_ENV}={path} is missing, unreadable or empty; point it at a copy "
                             f"of the head's token file ({GET_TOKEN}) or unset it")
        return f"{TOKEN_PATH_ENV}={path}"
    try:
        if DEFAULT_TOKEN.expanduser().read_text().strip():
            return str(DEFAULT_TOKEN)
    except OSError:
        pass
    return None


def prepare_auth(address: str) -> str | None:
    """Set ``RAY_AUTH_MODE=token`` when a token is there and the mode is unset; call it before
    ``import ray``. Returns the token's source when one is sent."""
    source = token_source()
    if AUTH_MODE not in os.environ and source is not None:
        if "ray" in sys.modules:   # Ray has read its settings already and would not send the token
            raise RuntimeError("call tune.cluster.prepare_auth before importing ray")
        os.environ[AUTH_MODE] = "token"
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        return None
    if source is None:
        raise UsageError(f"--address {address}: {AUTH_MODE}=token but this machine has no Ray auth token; "
                         f"copy the head's {DEFAULT_TOKEN} to the same path here ({GET_TOKEN}), or set "
                         f"{TOKEN_ENV}")
    return source


def probe_head(address: str, source: str | None, timeout_s: float = 15.0) -> None:
    """Ask the head once, with ``ray status`` in a child process (this environment, its stderr kept
    from the user), whether it takes this driver: it does, refuses the token, or is not a Ray head."""
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        why = f"no answer to `ray status` within {timeout_s:g} s"
    else:
        if proc.returncode == 0:
            return
        if proc.returncode == REFUSED:
            mode = os.environ.get(AUTH_MODE)
            if source is not None:
                raise UsageError(f"--address {address}: the Ray head refused the auth token from {source} (it "
                                 f"is not the head's); put the head's token there instead ({GET_TOKEN})")
            if mode:
                raise UsageError(f"--address {address}: the Ray head requires token auth but {AUTH_MODE}={mode} "
                                 f"here; unset it (or set it to token) and copy the head's token to "
                                 f"{DEFAULT_TOKEN} ({GET_TOKEN})")
            raise UsageError(f"--address {address}: the Ray head requires token auth and this machine has no "
                             f"token; copy the head's {DEFAULT_TOKEN} to the same path here ({GET_TOKEN}), "
                             f"or set {TOKEN_ENV}")
        if proc.returncode == NOT_FOUND and address == "auto":
            raise UsageError("--address auto: no Ray cluster was started on this machine; start one with "
                             "`ray start --head`, or give the head's host:port")
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:120]
    raise UsageError(f"--address {address}: something answers there but no Ray head does ({why}); "
                     "give the address `ray start --head` printed (port 6379 unless --port was given)")


def watch_head(address: str, interval_s: float = 0.25, misses: int = 4) -> threading.Thread:
    """While this driver is connected, connect to the head's port every ``interval_s``; once it
    refuses ``misses`` times in a row the cluster is gone: one line on stderr and exit
    :data:`HEAD_LOST_EXIT` (Ray itself would wait a minute and abort with a native stack)."""
    import ray

    _, host, port = split_address(address)
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "palgan"
    line = (f"{prog}: error: the Ray head at {address} stopped answering mid-run; start the cluster again "
            "and rerun the same command with --resume (and the new --address) to finish\n")

    def loop():
        missed = 0
        while ray.is_initialized():
            try:
                socket.create_connection((host, port), timeout=2.0).close()
                missed = 0
            except OSError:
                missed += 1
                if missed >= misses and ray.is_initialized():
                    sys.stdout.flush()
                    os.write(2, line.encode())
                    os._exit(HEAD_LOST_EXIT)
            time.sleep(interval_s)

    thread = threading.Thread(target=loop, name="ray-head-watch", daemon=True)
    thread.start()
    return thread


def join(address: str) -> None:
    """``ray.init(address=...)`` with each way of failing turned into one line; then watch the head.
    Call :func:`prepare_auth` first where the caller imports ray before this."""
    check_reachable(address)
    source = prepare_auth(address)
    if address != "auto" and split_address(address)[0] == "ray":
        try:
            import grpc  # noqa: F401 - Ray Client's transport
        except ImportError:
            raise UsageError(f"--address {address}: Ray Client needs grpcio, which is not installed "
                             "(pip install 'ray[client]'); or run on a cluster node with --address "
                             "<head>:6379") from None
    else:
        probe_head(address, source)

    import ray
    from ray.exceptions import RayError

    try:   # Ray's "Connecting to ..." INFO lines would go to stderr; one line on stdout says it instead
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, RayError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"--address {address}: cannot join the Ray cluster ({first})") from None
    logging.getLogger("ray").setLevel(logging.INFO)
    if address == "auto":
        address = ray.get_runtime_context().gcs_address
    total = ray.cluster_resources()
    print(f"joined the Ray cluster at {address}: {len(ray.nodes())} node(s), {total.get('CPU', 0):g} CPUs, "
          f"{total.get('GPU', 0):g} GPUs; auth: {'token from ' + source if source else 'none'}", flush=True)
    watch_head(address)


def hide_unassigned_gpus(gpu_ids: list, environ=os.environ) -> None:
    """In a trial: show CUDA only the GPUs Ray gave it (``ray.get_gpu_ids()``), none for a 0-GPU trial.

    Ray 2.60 no longer empties CUDA_VISIBLE_DEVICES for a worker that asked for no GPU, so a trial
    of ``--gpus-per-trial 0`` would see every GPU and the trainer's Accelerator would take cuda:0,
    every such trial the same one. Call before anything initialises CUDA in the worker."""
    if not gpu_ids:
        environ["CUDA_VISIBLE_DEVICES"] = ""

