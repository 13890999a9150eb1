"""gelato-edge asked to stop before its asyncio handlers are in place (importing torch and
transformers takes seconds). As a container's PID 1 a SIGTERM's default action is none: `docker
stop` then waited for SIGKILL while the edge went on to load and serve. It stops as it does while
the target loads: at once, exit 0. Also how a start that fails late says so (one line, exit 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_sigterm_while_the_edge_starts_stops_it_at_once() -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys
        import gelato.edge.cli as cli

        real = cli.setup_torch_threads

        def importing_torch(threads):  # the window: torch's import, before serve's handlers exist
            os.kill(os.getpid(), signal.SIGTERM)
            return real(threads)

        cli.setup_torch_threads = importing_torch
        sys.exit(cli.main(["--port", "0"]))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])  # not killed by the signal (-15)
    assert "stopped while loading the target" in res.stderr and "listening on" not in res.stdout


def test_a_ctrl_c_while_the_edge_starts_stops_it_at_once() -> None:
    """SIGINT there was a KeyboardInterrupt traceback and exit 130 (only SIGTERM was kept)."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        import gelato.edge.cli as cli

        real = cli.setup_torch_threads

        def importing_torch(threads):
            os.kill(os.getpid(), signal.SIGINT)
            return real(threads)

        cli.setup_torch_threads = importing_torch
        sys.exit(cli.main(["--port", "0"]))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr
    assert "stopped while loading the target" in res.stderr and "listening on" not in res.stdout


def test_an_edge_served_from_another_thread_starts() -> None:
    """`main` has a branch for a thread other than the main one, but `serve` then installed
    asyncio signal handlers, which only the main thread may: a RuntimeError traceback."""
    script = textwrap.dedent(
        """
        import asyncio, sys, threading
        import gelato.edge.cli as cli
        from gelato.edge.config import EdgeConfig

        class Loaded(Exception):
            pass

        async def no_load(server, config):
            raise Loaded

        cli.load_target = no_load
        out = []
        t = threading.Thread(target=lambda: out.append(asyncio.run(cli.serve(EdgeConfig(port=0)))))
        t.start(); t.join(60)
        sys.exit(0 if out == [2] else 1)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "set_wakeup_fd" not in res.stderr


def test_json_logs_keep_grpc_cores_own_lines_out() -> None:
    """Under `--log-format json` gRPC's C core logs errors only: at its default it wrote a plain
    line for every failed TLS handshake, so a plaintext connect to a TLS port put a non-JSON line
    in a collector's input. The variable takes effect only if set before gRPC loads, which the
    edge's CLI module does not import (its TLS helpers import it when called)."""
    script = textwrap.dedent(
        """
        import os, sys
        os.environ.pop("GRPC_VERBOSITY", None)
        import gelato.edge.cli
        from gelato.cli_common import setup_logging
        assert "grpc" not in sys.modules, "gelato.edge.cli imports grpc: GRPC_VERBOSITY would come too late"
        setup_logging("INFO", "json")
        print(os.environ.get("GRPC_VERBOSITY"))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ERROR", res.stderr


def test_a_tls_file_that_went_bad_after_the_checks_is_one_line() -> None:
    """The TLS files are read again when the port is bound, seconds after the settings were checked
    (torch's import in between): a key rotated or unmounted then escaped as a SecurityConfigError
    traceback, exit 1, where any other bad TLS file is one line and exit 2."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        import gelato.edge.cli as cli
        import gelato.edge.server as server
        from gelato.edge.config import EdgeConfig
        from gelato.security import SecurityConfigError

        def gone(*args):
            raise SecurityConfigError("--tls-key /run/gelato/edge.key: no such file")

        server.server_credentials = gone
        sys.exit(asyncio.run(cli.serve(EdgeConfig(port=0, tls_cert="edge.crt", tls_key="edge.key"))))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "error: --tls-key /run/gelato/edge.key: no such file" in res.stderr


def test_ctrl_c_stops_a_hanging_health_check() -> None:
    """`--health-check` is a probe: Ctrl-C was held (the edge's start-up trap) for its whole
    timeout (up to 10^7 s) against a peer that never answers. It stops it now, exit 130, one line."""
    import signal
    import socket
    import time

    with socket.socket() as silent:  # accepts connections, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        cmd = [sys.executable, "-m", "gelato.edge.cli", "--health-check", f"127.0.0.1:{port}"]
        proc = subprocess.Popen([*cmd, "--health-check-timeout-s", "60"], stderr=subprocess.PIPE, text=True)
        silent.settimeout(60)
        conn, _ = silent.accept()  # the probe connected: past the imports and the start-up trap
        with conn:
            time.sleep(0.5)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.perf_counter() - t0 < 10, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
