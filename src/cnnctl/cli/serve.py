"""A trained model over HTTP: serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnctl.errors import CnnctlError
from cnnctl.extras import require

from .common import ThreadsOption, app, checkpoint_of, guarded, out, use_threads


@app.command()
@guarded
def serve(
    target: Annotated[Path, typer.Argument(metavar="CHECKPOINT|RUN_DIR|MODEL.onnx")],
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", help="Address to listen on (loopback by "
                                      "default; 0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=0, max=65535,
                                      help="0: a free port, announced on start.")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", metavar="N", min=1, help="Images per forward pass: "
                                           "concurrent requests are gathered up to this many.")] = 32,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", metavar="MS", min=0, help="How long a batch waits "
                                               "for more requests after its first.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", metavar="MB", min=0.001, help="Largest request "
                                               "body accepted (413 above it).")] = 16.0,
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="The model's name in the Open "
                                             "Inference Protocol's paths (default: the run's name).")] = None,
    threads: ThreadsOption = None,
):
    """Serve a model over HTTP: POST /predict (pictures or pixels), the Open Inference Protocol v2 (/v2/health/ready,
    /v2/models/NAME/infer), /metrics, a page at / to drop a picture on, and the API's documentation at /docs.
    A checkpoint or run runs on cnnctl's NumPy forward pass, an .onnx file on onnxruntime. Ctrl+C or SIGTERM stops
    taking requests and answers those in flight first."""
    from cnnctl.serve.app import create_app
    from cnnctl.serve.backends import open_model

    uvicorn = require("uvicorn", "serve", "cnnctl serve needs FastAPI and uvicorn, which are not installed")
    use_threads(threads)
    served = open_model(target if target.suffix == ".onnx" else checkpoint_of(target), name)
    application = create_app(served, max_batch, max_wait_ms, int(max_body_mb * 2**20))
    config = uvicorn.Config(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                            server_header=False)
    server = uvicorn.Server(config)
    sock = _listening(host, port)  # bound before it is announced: a taken port is one error, no "serving" line
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    shown = f"[{host}]" if ":" in host else host
    out.print(f"serving {served.name} ({served.platform}, {len(served.classes)} classes) on http://{shown}:{port}  "
              f"page /, API /docs, metrics /metrics; Ctrl+C stops")
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits when it cannot start: it never served
        pass
    finally:
        sock.close()
    if not server.started:
        raise CnnctlError(f"cannot serve on {host}:{port}", "choose another --port or --host")


def _listening(host: str, port: int):
    """A TCP socket bound to host:port (IPv6 for an address with ':'), or the error that names them."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise CnnctlError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})",
                          "choose another --port or --host (a port in use, or not an address of this machine)") \
            from None
    sock.set_inheritable(True)
    return sock
