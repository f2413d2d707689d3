"""Session-wide test setup and the fixtures several test folders share.

TRITON_INTERPRET=1 is set here, before anything imports Triton, so every Triton kernel in the
session is defined for the CPU interpreter: the kernel tests (tests/kernels) run the real kernels
on CPU tensors, and model tests that pick a Triton attention backend on float32/float16 CPU tensors
run it too (bfloat16 CPU tensors always take the PyTorch references, see turbo_kernels.dispatch).
Triton fixes the mode when a kernel is defined, so setting it later (e.g. in tests/kernels'
conftest) would depend on which test module happened to import turbo_kernels first.

The fixtures live here rather than in a folder's conftest.py so that tests/serving, tests/load and
tests/reliability share one Ray cluster and one deployed application (Ray start is slow), and
tests/api and tests/reliability one in-process API factory. Heavy imports stay inside them.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402

from serving_support import ServedApp, free_port  # noqa: E402


def pytest_collection_modifyitems(items):
    """Tests on the shared `served_app` run last, in their usual order: its Ray cluster lives until
    the session ends, and tests that start a Ray of their own in this process (tests/metrics) or
    expect none (the local metrics backend) must have run by then."""
    items.sort(key=lambda item: "served_app" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def served_app(tmp_path_factory) -> ServedApp:
    """The application on a real Ray cluster on the CPU. The deployments ask for fractional GPUs as
    on a one-GPU host; Ray provides logical GPUs, so the GPU placement of the production config is
    what gets scheduled, and the replicas run on the CPU."""
    import ray
    from ray import serve

    from turbo_serve.serving.app import build_app
    from turbo_serve.settings import Settings

    storage = tmp_path_factory.mktemp("serve-storage")
    port = free_port()
    gpu_share = {"num_cpus": 0.25}
    settings = Settings(
        models=["tiny-t2v", "tiny-i2v"],
        storage_dir=str(storage),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        max_queued_jobs=6,
        max_running_jobs=2,
        lease_s=3.0,
        poll_interval_s=0.2,
        job_max_attempts=2,
        gpu_exporter_port=0,  # any free port: several test sessions may share a host
        gpu_exporter_host="127.0.0.1",
        deployments={
            "Denoiser": {**gpu_share, "num_gpus": 0.5, "graceful_shutdown_timeout_s": 5.0},
            "VAE": {**gpu_share, "num_gpus": 0.25, "graceful_shutdown_timeout_s": 5.0},
            "TextEncoder": {**gpu_share, "num_gpus": 0.25, "graceful_shutdown_timeout_s": 5.0},
            "Ingress": {**gpu_share, "graceful_shutdown_timeout_s": 5.0},
        },
    )
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name="turbo-serve", route_prefix="/")
        yield ServedApp(url=f"http://127.0.0.1:{port}", settings=settings, storage=storage)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def make_api(tmp_path):
    """The API in-process (FastAPI TestClient, no Ray) on the real tiny pipeline stages.

    make_api(run_jobs=True, **settings) -> (TestClient, ApiContext). Without run_jobs the runner
    never starts, so jobs stay queued (deterministic admission tests)."""
    from fastapi.testclient import TestClient

    from turbo_serve.api.app import ApiContext, create_app
    from turbo_serve.jobs.local_stages import LocalStages
    from turbo_serve.jobs.runner import JobRunner
    from turbo_serve.jobs.storage import Storage
    from turbo_serve.jobs.store import open_store
    from turbo_serve.settings import Settings

    @contextmanager
    def make(run_jobs: bool = True, **overrides):
        settings = Settings(**{"storage_dir": str(tmp_path / "storage"),
                               "cache_dir": str(tmp_path / "cache"), "poll_interval_s": 0.05, **overrides})  # fmt: skip
        store = open_store(settings.resolved_job_store_url)  # SQLite in the storage folder unless job_store_url
        storage = Storage(settings.storage_dir)
        stages = LocalStages(settings, store, storage) if run_jobs else None
        runner = JobRunner.from_settings(settings, store, stages, storage)
        context = ApiContext(settings, store, storage, runner, shutdown_grace_s=5.0)
        client = TestClient(create_app(context), raise_server_exceptions=False)
        if run_jobs:
            with client:  # runs the lifespan: the runner starts and stops with it
                yield client, context
        else:
            yield client, context
        store.close()

    return make
