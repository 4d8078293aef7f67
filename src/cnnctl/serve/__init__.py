"""`cnnctl serve`: a trained model over HTTP. `backends` opens what is served (a checkpoint or run through cnnctl's
NumPy forward pass, an exported .onnx through onnxruntime), `bodies` turns request bodies into pixels,
`batching` gathers concurrent requests into one forward, `metrics` counts for Prometheus, `page` is the page a
person drops an image on, and `app` puts them together as an ASGI application (FastAPI on uvicorn: the `serve`
extra)."""
