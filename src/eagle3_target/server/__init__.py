"""The standalone target server: ``eagle3-target serve``.

- :mod:`.app` - assembles the HTTP app (FastAPI): lifespan, errors, health, metrics;
- :mod:`.auth` - the token check and the guard around every request;
- :mod:`.routes_v1` - the native ``/v1`` endpoints (protocol: :mod:`eagle3_target.wire.v1`);
- :mod:`.routes_nemo` - NeMo Automodel's remote-target endpoints (NMET bodies);
- :mod:`.state` - settings (the one source of the server's defaults) and shared state;
- :mod:`.worker` - the batching worker thread that owns the engine;
- :mod:`.outputs` - what each mode answers, from the engine's output;
- :mod:`.metrics` - Prometheus metrics;
- :mod:`.protocol` - the HTTP/1.1 connection and its bounds (headers, deadlines, stalls);
- :mod:`.run` - bind safety, the token, the process lifecycle (:func:`~.run.run_server`);
- :mod:`.process` - start/stop a server subprocess (the demo, benchmarks, tests).

Importing this package imports no web framework; the submodules do.
"""
