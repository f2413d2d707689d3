"""The turbo-serve workload for running locust directly (web UI, distributed master/workers):

    locust -f deploy/loadtest/locustfile.py -H http://127.0.0.1:8000 \
        --workload deploy/loadtest/profiles/cpu.yaml --arrival-s 120

The workload itself lives in the package (turbo_serve/loadtest/locustfile.py) so that
`turbo-serve loadtest` finds it in an installed copy too; see that module for what it does.
"""

from turbo_serve.loadtest.locustfile import ArrivalShape, VideoJobUser  # noqa: F401  (locust collects these)
