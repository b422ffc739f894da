"""The standalone target server: ``eagle3-target serve``.

- :mod:`.protocol` - the native ``/v1`` protocol (modes, parameters, validation, errors);
- :mod:`.nmet` - NeMo Automodel's NMET tensor codec, for the root endpoints only;
- :mod:`.engine` - the engine worker thread that batches requests into engine calls;
- :mod:`.app` - the HTTP app (FastAPI): auth, limits, endpoints, metrics;
- :mod:`.metrics` - Prometheus metrics;
- :mod:`.cli` - flags, bind safety, lifecycle (``run_server``);
- :mod:`.process` - start/stop a server subprocess (demo, benchmarks, tests).

Importing this package imports no web framework; the submodules do.
"""
