"""The ASGI application (FastAPI): `/predict` and `/explain` for pictures and pixels, the Open Inference Protocol
v2 (health, model metadata, infer), `/metrics` for Prometheus, the page at `/`, and OpenAPI at `/openapi.json`
with its documentation page at `/docs`. Bad input is a 4xx with a JSON error naming what was wrong; bodies are
bounded; the model runs on one worker thread, fed by the dynamic batcher."""


import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np

from cnnctl.errors import CnnctlError
from cnnctl.extras import require
from cnnctl.version import __version__

from . import bodies
from .backends import Served
from .batching import Batcher
from .metrics import Metrics
from .page import CSP, SCRIPT, page

log = logging.getLogger("cnnctl.serve")

PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"description": "pixels in 0..1: one image C x H x W (H x W for one channel) "
                                                   "or a batch N x C x H x W, as nested arrays",
                                    "type": "array", "items": {}}}}}}
PREDICTION = {"type": "array", "items": {"type": "object", "properties": {
    "input": {"type": "string"}, "prediction": {"type": "string"},
    "top": {"type": "array", "items": {"type": "object", "properties": {
        "class": {"type": "string"}, "probability": {"type": "number"}}}}}}}


class BodyTooLarge(Exception):
    pass


class Bounded:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (by its Content-Length before any byte
    is read, else when the bytes received pass the limit); every answer is counted in the metrics by its route."""

    def __init__(self, app, limit: int, metrics: Metrics, routes):
        self.app, self.limit, self.metrics, self.routes = app, limit, metrics, routes

    def _route(self, scope) -> str:
        from starlette.routing import Match

        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, received = time.perf_counter(), [500], [0]
        path = self._route(scope)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def bounded_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.limit:
                    raise BodyTooLarge
            return message

        try:
            length = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        try:
            if length > self.limit:
                raise BodyTooLarge
            await self.app(scope, bounded_receive, counted_send)
        except BodyTooLarge:
            await _send_json(counted_send, 413, {"error": f"the request body is over {self.limit:,} bytes",
                                                 "fix": "send fewer or smaller pictures per request"})
        finally:
            self.metrics.request(path, status[0], time.perf_counter() - start)


async def _send_json(send, status: int, body: dict) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": raw})


def create_app(served: Served, max_batch: int = 32, max_wait_ms: float = 5.0, max_body: int = 16 * 2**20):
    """The application serving `served`: warmed up (one batch) before it says ready."""
    require("fastapi", "serve", "cnnctl serve needs FastAPI and uvicorn, which are not installed")
    require("multipart", "serve", "cnnctl serve needs python-multipart, which is not installed")
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    metrics = Metrics(max_batch)
    executor = ThreadPoolExecutor(1, thread_name_prefix="cnnctl-model")
    batcher = Batcher(served.probabilities, max_batch, max_wait_ms / 1000, executor, metrics.batched)
    state = {"warm": False}

    def ready() -> bool:
        return state["warm"] and batcher.alive

    async def warm_up():
        await batcher.submit(np.zeros((min(max_batch, 8), *served.input_shape), np.float32))
        state["warm"] = True
        log.info("ready: %s", served.name)

    @asynccontextmanager
    async def lifespan(_):
        batcher.start()
        warming = asyncio.get_running_loop().create_task(warm_up())
        yield
        warming.cancel()
        await batcher.stop()
        executor.shutdown(wait=True)

    app = FastAPI(title=f"cnnctl serve: {served.name}", version=__version__, lifespan=lifespan,
                  description=f"{served.name} ({served.platform}, {len(served.classes)} classes, input "
                              f"{' x '.join(map(str, served.input_shape))}).")

    @app.exception_handler(bodies.RequestError)
    async def refused(_, e: bodies.RequestError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(CnnctlError)
    async def cnnctl_error(_, e: CnnctlError):
        return JSONResponse({"error": e.message, **({"fix": e.hint} if e.hint else {})}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 422)

    @app.exception_handler(Exception)
    async def bug(_, e: Exception):
        log.exception("internal error")
        return JSONResponse({"error": f"internal error ({type(e).__name__}); the server's log has the details"},
                            500)

    def _ready_or_503():
        if not ready():
            raise bodies.RequestError(503, "the model is not ready (warming up, or its worker stopped)",
                                      "wait for GET /v2/health/ready to answer 200")

    async def _images(request: Request) -> tuple[list[str], np.ndarray]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(max_files=bodies.MAX_IMAGES + 1, max_fields=bodies.MAX_IMAGES + 1)
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
            return [n for n, _ in files], bodies.pictures(files, served.input_shape, served.resize)
        if kind.startswith("image/") or kind == "application/octet-stream":
            return ["body"], bodies.pictures([("the body", await request.body())], served.input_shape, served.resize)
        if kind == "application/json":
            x = bodies.pixels(_json(await request.body()), served.input_shape)
            return [f"pixels[{i}]" for i in range(len(x))], x
        raise bodies.RequestError(415, f"content type {kind or '(none)'!r} is not one /predict takes",
                                  "send multipart/form-data picture files, a raw image/* body, or application/json "
                                  "pixels")

    def _model(name: str) -> None:
        if name != served.name:
            raise bodies.RequestError(404, f"no model named {name!r}; this server serves {served.name!r}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return HTMLResponse(page(served.name, served.platform, served.classes, served.explain is not None),
                            headers={"content-security-policy": CSP})

    @app.get("/page.js", include_in_schema=False)
    async def script():
        return Response(SCRIPT, media_type="text/javascript")

    @app.post("/predict", openapi_extra=PREDICT_BODY, summary="Top classes of pictures or pixels",
              responses={200: {"content": {"application/json": {"schema": PREDICTION}}}})
    async def predict(request: Request, top_k: int = Query(3, ge=1, description="Classes per input.")):
        """The top-k classes of each picture (multipart files, or a raw image body) or of JSON pixels in 0..1,
        with their probabilities: what `cnnctl predict --json` prints for the same input."""
        from cnnctl.tools.predict import top_classes

        _ready_or_503()
        names, x = await _images(request)
        probs = await batcher.submit(x)
        return top_classes(names, probs, served.classes, top_k)

    @app.post("/explain", openapi_extra=PREDICT_BODY, summary="Grad-CAM of a picture, as a PNG",
              responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request):
        """The Grad-CAM picture `cnnctl explain --method gradcam` draws for the first picture of the request
        (a checkpoint or run served through NumPy; not an .onnx file)."""
        _ready_or_503()
        if served.explain is None:
            raise bodies.RequestError(404, "Grad-CAM needs the model's gradients: it is not served for an .onnx file",
                                      "serve the checkpoint or run directory instead")
        names, x = await _images(request)
        png, _ = (await asyncio.get_running_loop().run_in_executor(executor, served.explain, x[:1], names[:1]))[0]
        return Response(png, media_type="image/png")

    @app.get("/v2", summary="Server metadata (Open Inference Protocol v2)")
    async def server_metadata():
        return {"name": "cnnctl", "version": __version__, "extensions": []}

    @app.get("/v2/health/live", summary="Live: the server answers")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="Ready: model loaded, one batch run, its worker alive")
    async def health_ready():
        return JSONResponse({"ready": ready()}, 200 if ready() else 503)

    @app.get("/v2/models/{name}", summary="Model metadata: inputs, outputs, classes")
    async def model_metadata(name: str):
        _model(name)
        return {"name": served.name, "versions": [], "platform": served.platform,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *served.input_shape]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(served.classes)]}],
                "parameters": {"classes": served.classes, "pixels": "0..1 (UINT8: 0..255)"}}

    @app.get("/v2/models/{name}/ready", summary="Whether this model is ready")
    async def model_ready(name: str):
        _model(name)
        return JSONResponse({"name": name, "ready": ready()}, 200 if ready() else 503)

    @app.post("/v2/models/{name}/infer", summary="Class probabilities of a tensor of pixels (Open Inference Protocol)")
    async def infer(name: str, request: Request):
        """{"inputs": [{"name": "input", "shape": [N, C, H, W], "datatype": "FP32", "data": [...]}]} with pixels
        in 0..1 (UINT8: 0..255); answers the probabilities of every class, N x classes."""
        _model(name)
        _ready_or_503()
        rid, x = bodies.tensor(_json(await request.body()), served.input_shape)
        probs = await batcher.submit(x)
        return {"model_name": served.name, "id": rid, "parameters": {"classes": served.classes},
                "outputs": [{"name": "probabilities", "shape": list(probs.shape), "datatype": "FP32",
                             "data": probs.ravel().tolist()}]}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(ready()), media_type="text/plain; version=0.0.4")

    app.add_middleware(Bounded, limit=max_body, metrics=metrics, routes=app.router.routes)
    return app


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise bodies.RequestError(400, "the body is not valid JSON") from None
