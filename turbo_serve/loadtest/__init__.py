"""Load testing the HTTP API: a locust workload of whole video jobs, arrival-rate shapes, and the
report (`turbo-serve loadtest`). Only `locustfile` imports locust (which monkey-patches the process
with gevent); the runner starts it in a subprocess."""
