"""The ASGI application (FastAPI): `/predict` and `/explain` for pictures and pixels, the Open Inference Protocol
v2 (health, model metadata, infer), `/metrics` for Prometheus, the page at `/`, and OpenAPI at `/openapi.json`
with its documentation page at `/docs`. Bad input is a 4xx with a JSON error naming what was wrong; bodies are
bounded; the model runs on one worker thread, fed by the dynamic batcher.

Its annotations are evaluated (no `from __future__ import annotations`): FastAPI reads the routes' parameter
types, defined in the functions' scope."""

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np

from cnnctl.errors import CnnctlError
from cnnctl.extras import require

require("fastapi", "serve", "cnnctl serve needs FastAPI and uvicorn, which are not installed")
require("python_multipart", "serve", "cnnctl serve needs python-multipart, which is not installed")

from fastapi import FastAPI, Query, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from cnnctl.tools.predict import top_classes  # noqa: E402
from cnnctl.version import __version__  # noqa: E402

from . import bodies  # noqa: E402
from .backends import Served  # noqa: E402
from .batching import Batcher  # noqa: E402
from .metrics import Metrics  # noqa: E402
from .page import CSP, SCRIPT, page  # noqa: E402

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


class Service:
    """The served model behind the routes: its batcher on one model thread, its metrics, and whether it is ready
    (loaded, one warm-up batch run, its batcher alive)."""

    def __init__(self, served: Served, max_batch: int, max_wait_ms: float):
        self.served, self.max_batch = served, max_batch
        self.metrics = Metrics(max_batch)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cnnctl-model")
        self.batcher = Batcher(served.probabilities, max_batch, max_wait_ms / 1000, self.executor,
                               lambda n: self.warm and self.metrics.batched(n))  # the warm-up batch serves no one
        self.warm = False

    def ready(self) -> bool:
        return self.warm and self.batcher.alive

    async def _warm_up(self) -> None:
        await self.batcher.submit(np.zeros((min(self.max_batch, 8), *self.served.input_shape), np.float32))
        self.warm = True
        log.info("ready: %s", self.served.name)

    @asynccontextmanager
    async def lifespan(self, _):
        self.batcher.start()
        warming = asyncio.get_running_loop().create_task(self._warm_up())
        yield
        warming.cancel()
        await self.batcher.stop()
        self.executor.shutdown(wait=True)

    def check_ready(self) -> None:
        if not self.ready():
            raise bodies.RequestError(503, "the model is not ready (warming up, or its worker stopped)",
                                      "wait for GET /v2/health/ready to answer 200")

    def check_name(self, name: str) -> None:
        if name != self.served.name:
            raise bodies.RequestError(404, f"no model named {name!r}; this server serves {self.served.name!r}")

    async def images(self, request: Request) -> tuple[list[str], np.ndarray]:
        """(names, pixels) of a /predict body: multipart picture files, a raw picture, or JSON pixels."""
        served = self.served
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

    def check_explains(self) -> None:
        if self.served.explain is None:
            raise bodies.RequestError(404, "Grad-CAM needs the model's gradients: it is not served for an .onnx file",
                                      "serve the checkpoint or run directory instead")

    async def explain(self, x: np.ndarray, names: list[str]) -> bytes:
        """The Grad-CAM picture (PNG) of the first image, drawn on the model's thread."""
        self.check_explains()
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self.executor, self.served.explain, x[:1], names[:1]))[0][0]

    def metadata(self) -> dict:
        served = self.served
        return {"name": served.name, "versions": [], "platform": served.platform,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *served.input_shape]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(served.classes)]}],
                "parameters": {"classes": served.classes, "pixels": "0..1 (UINT8: 0..255)"}}


def create_app(served: Served, max_batch: int = 32, max_wait_ms: float = 5.0, max_body: int = 16 * 2**20) -> FastAPI:
    """The application serving `served`: warmed up (one batch) before it says ready."""
    service = Service(served, max_batch, max_wait_ms)
    app = FastAPI(title=f"cnnctl serve: {served.name}", version=__version__, lifespan=service.lifespan,
                  description=f"{served.name} ({served.platform}, {len(served.classes)} classes, input "
                              f"{' x '.join(map(str, served.input_shape))}).")
    _errors(app)
    _prediction_routes(app, service)
    _protocol_routes(app, service)
    app.add_middleware(Bounded, limit=max_body, metrics=service.metrics, routes=app.router.routes)
    return app


def _errors(app: FastAPI) -> None:
    """Every refusal a JSON body {"error", "fix"}; an error of cnnctl's own a 500 without its traceback."""

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


def _prediction_routes(app: FastAPI, service: Service) -> None:
    served = service.served

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return HTMLResponse(page(served.name, served.platform, served.classes, served.explain is not None),
                            headers={"content-security-policy": CSP})

    @app.get("/page.js", include_in_schema=False)
    async def script():
        return Response(SCRIPT, media_type="text/javascript")

    @app.post("/predict", openapi_extra=PREDICT_BODY, summary="Top classes of pictures or pixels",
              responses={200: {"content": {"application/json": {"schema": PREDICTION}}}})
    async def predict(request: Request, top_k: int = Query(3, ge=1, description="Classes per input."),
                      threshold: float = Query(0.5, ge=0.0, le=1.0, description="Multi-label models: every "
                                               "label of this probability or more.")):
        """The top-k classes of each picture (multipart files, or a raw image body) or of JSON pixels in 0..1,
        with their probabilities: what `cnnctl predict --json` prints for the same input (a multi-label model's
        with `labels`, every label of probability `threshold` or more)."""
        service.check_ready()
        with service.batcher.expecting():
            names, x = await service.images(request)
            probs = await service.batcher.submit(x)
        return top_classes(names, probs, served.classes, top_k, threshold if served.multilabel else None)

    @app.post("/explain", openapi_extra=PREDICT_BODY, summary="Grad-CAM of a picture, as a PNG",
              responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request):
        """The Grad-CAM picture `cnnctl explain --method gradcam` draws for the first picture of the request
        (a checkpoint or run served through NumPy; not an .onnx file)."""
        service.check_ready()
        service.check_explains()  # before the body is read
        names, x = await service.images(request)
        return Response(await service.explain(x, names), media_type="image/png")

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus():
        return PlainTextResponse(service.metrics.text(service.ready()), media_type="text/plain; version=0.0.4")


def _protocol_routes(app: FastAPI, service: Service) -> None:
    """The Open Inference Protocol (KServe v2): health, server and model metadata, infer."""

    @app.get("/v2", summary="Server metadata (Open Inference Protocol v2)")
    async def server_metadata():
        return {"name": "cnnctl", "version": __version__, "extensions": []}

    @app.get("/v2/health/live", summary="Live: the server answers")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="Ready: model loaded, one batch run, its worker alive")
    async def health_ready():
        return JSONResponse({"ready": service.ready()}, 200 if service.ready() else 503)

    @app.get("/v2/models/{name}", summary="Model metadata: inputs, outputs, classes")
    async def model_metadata(name: str):
        service.check_name(name)
        return service.metadata()

    @app.get("/v2/models/{name}/ready", summary="Whether this model is ready")
    async def model_ready(name: str):
        service.check_name(name)
        return JSONResponse({"name": name, "ready": service.ready()}, 200 if service.ready() else 503)

    @app.post("/v2/models/{name}/infer", summary="Class probabilities of a tensor of pixels (Open Inference Protocol)")
    async def infer(name: str, request: Request):
        """{"inputs": [{"name": "input", "shape": [N, C, H, W], "datatype": "FP32", "data": [...]}]} with pixels
        in 0..1 (UINT8: 0..255); answers the probabilities of every class, N x classes."""
        service.check_name(name)
        service.check_ready()
        with service.batcher.expecting():
            rid, x = bodies.tensor(_json(await request.body()), service.served.input_shape)
            probs = await service.batcher.submit(x)
        return {"model_name": service.served.name, "id": rid, "parameters": {"classes": service.served.classes},
                "outputs": [{"name": "probabilities", "shape": list(probs.shape), "datatype": "FP32",
                             "data": probs.ravel().tolist()}]}


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise bodies.RequestError(400, "the body is not valid JSON") from None
