"""Joining a running Ray cluster from a driver: address checks, token auth, and a watch on the head.

Ray (2.52+) protects a cluster with a token when its head runs with ``RAY_AUTH_MODE=token``;
``ray start --head`` turns it on by itself when ``~/.ray/auth_token`` exists on the head (any
earlier local ``ray.init()`` writes one). A driver that joins by an explicit address sends the
token only with ``RAY_AUTH_MODE=token`` set, and reads it, in Ray's order, from ``RAY_AUTH_TOKEN``,
the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``
(https://docs.ray.io/en/latest/ray-security/token-auth.html). :func:`join` turns token mode on
when a token is there (a head without auth accepts such a driver too), asks the head's GCS once,
with a short timeout, whether it takes this driver, and turns each way of failing into one
line (:class:`UsageError`) instead of Ray's 20 s of retries.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from trainers.cli import UsageError

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN = Path("~/.ray/auth_token")
HEAD_LOST_EXIT = 1            # exit code of a driver whose cluster went away mid-run
GET_TOKEN = "`ray get-auth-token` on the head prints it"


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


def enable_token_mode() -> None:
    """``RAY_AUTH_MODE=token`` for this process, also when Ray has already read its settings."""
    os.environ[AUTH_MODE] = "token"
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


def prepare_auth(address: str) -> str | None:
    """Set up token auth the way Ray documents it; returns the token's source when one is sent."""
    mode = os.environ.get(AUTH_MODE)
    source = token_source()
    if mode is None and source is not None:
        enable_token_mode()
        mode = "token"
    if (mode or "").lower() != "token":
        return None
    if source is None:
        raise UsageError(f"--address {address}: {AUTH_MODE}=token but this machine has no Ray auth token; "
                         f"copy the head's {DEFAULT_TOKEN} to the same path here ({GET_TOKEN}), or set "
                         f"{TOKEN_ENV}")
    enable_token_mode()   # a token from the environment may differ from the one Ray cached
    return source


@contextmanager
def quiet_native_stderr():
    """Ray's C++ client logs each refused call on file descriptor 2; the caller reports instead."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def probe_head(address: str, source: str | None, timeout_s: float = 5.0) -> None:
    """Ask the GCS at ``host:port`` for the cluster id, once: it answers, refuses the token, or is
    not a Ray head. Skipped where this Ray lacks the client used (ray.init still reports)."""
    try:
        from ray._raylet import InnerGcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        with quiet_native_stderr():
            InnerGcsClient.standalone(address, None, int(timeout_s * 1000))
    except AuthenticationError:
        if source is not None:
            raise UsageError(f"--address {address}: the Ray head refused the auth token from {source} (it is "
                             f"not the head's); put the head's token there instead ({GET_TOKEN})") from None
        if os.environ.get(AUTH_MODE):
            raise UsageError(f"--address {address}: the Ray head requires token auth but {AUTH_MODE}="
                             f"{os.environ[AUTH_MODE]} here; unset it (or set it to token) and copy the head's "
                             f"token to {DEFAULT_TOKEN} ({GET_TOKEN})") from None
        raise UsageError(f"--address {address}: the Ray head requires token auth and this machine has no "
                         f"token; copy the head's {DEFAULT_TOKEN} to the same path here ({GET_TOKEN}), "
                         f"or set {TOKEN_ENV}") from None
    except Exception as err:   # noqa: BLE001 - Ray raises RpcError, RuntimeError, ... here
        first = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise UsageError(f"--address {address}: something answers there but no Ray head does ({first}); "
                         "give the address `ray start --head` printed (port 6379 unless --port was given)") from None


def resolve(address: str) -> str:
    """``auto`` -> the host:port of the cluster last started on this machine."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address

    found = canonicalize_bootstrap_address("auto")
    if found is None:
        raise UsageError("--address auto: no Ray cluster was started on this machine; start one with "
                         "`ray start --head`, or give the head's host:port")
    return found


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
    """``ray.init(address=...)`` with each way of failing turned into one line; then watch the head."""
    import ray
    from ray.exceptions import RayError

    address = resolve(address)
    check_reachable(address)
    if split_address(address)[0] == "ray":
        try:
            import grpc  # noqa: F401 - Ray Client's transport
        except ImportError:
            raise UsageError(f"--address {address}: Ray Client needs grpcio, which is not installed "
                             "(pip install 'ray[client]'); or run on a cluster node with --address "
                             "<head>:6379") from None
        source = prepare_auth(address)
    else:
        source = prepare_auth(address)
        probe_head(address, source)
    try:   # Ray's "Connecting to ..." INFO lines would go to stderr; one line on stdout says it instead
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, RayError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"--address {address}: cannot join the Ray cluster ({first})") from None
    logging.getLogger("ray").setLevel(logging.INFO)
    total = ray.cluster_resources()
    print(f"joined the Ray cluster at {address}: {len(ray.nodes())} node(s), {total.get('CPU', 0):g} CPUs, "
          f"{total.get('GPU', 0):g} GPUs; auth: {'token from ' + source if source else 'none'}", flush=True)
    watch_head(address)
