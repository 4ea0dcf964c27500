"""Load tests: locustfiles for HTTP and gRPC, and a headless runner (``fire loadtest``)."""
