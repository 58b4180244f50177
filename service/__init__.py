"""softserve's HTTP service: label sets streamed as image/label batches from their shards.

``app.create_app(settings)`` is the FastAPI application, wired from ``state`` (what its
requests share), ``requests`` (their validation) and the ``routes_*`` routers; ``server``
runs it under uvicorn (``softserve serve``), ``settings`` holds its ``SOFTSERVE_*``
configuration.
"""
