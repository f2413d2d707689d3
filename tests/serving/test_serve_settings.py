from pathlib import Path

import pytest
from pydantic import ValidationError

from turbo_serve.settings import Settings


def test_defaults_serve_tiny_t2v_on_the_cpu(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("TURBO_SERVE_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.models == ["tiny-t2v"] and settings.device == "cpu" and settings.attention_type == "sagesla"
    assert settings.resolved_job_store_url == "sqlite:///outputs/jobs.sqlite3"
    denoiser = settings.deployment_options("Denoiser")
    assert denoiser["max_ongoing_requests"] == 1 and denoiser["autoscaling_config"]["target_ongoing_requests"] == 1
    assert sum(d.num_cpus for d in settings.deployments.values()) <= 2  # fits a 2-core machine


def test_environment_and_arguments(monkeypatch):
    monkeypatch.setenv("TURBO_SERVE_MODELS", "tiny-t2v, tiny-i2v")
    monkeypatch.setenv("TURBO_SERVE_MAX_QUEUED_JOBS", "5")
    monkeypatch.setenv("TURBO_SERVE_DEPLOYMENTS__DENOISER__NUM_GPUS", "0.5")
    settings = Settings(max_queued_jobs=9)  # arguments (a config file's args) win over the environment
    assert settings.models == ["tiny-t2v", "tiny-i2v"] and settings.max_queued_jobs == 9
    assert settings.deployments["Denoiser"].num_gpus == 0.5
    assert settings.deployments["Denoiser"].max_ongoing_requests == 1  # the rest keeps its defaults
    assert settings.deployment_options("VAE")["ray_actor_options"]["num_gpus"] == 0.0


def test_gpus_default_by_device():
    cuda = Settings(device="cuda", deployments={"VAE": {"num_gpus": 0.2}})
    gpus = {kind: cuda.deployment_options(kind)["ray_actor_options"]["num_gpus"] for kind in cuda.deployments}
    assert gpus == {"Ingress": 0.0, "TextEncoder": 0.5, "Denoiser": 1.0, "VAE": 0.2}
    cpu = Settings(device="cpu")
    assert all(cpu.deployment_options(k)["ray_actor_options"]["num_gpus"] == 0.0 for k in cpu.deployments)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"models": ["sora-2"]}, "unknown model 'sora-2'; valid models"),
        ({"models": ["tiny-t2v", "wan2.1-t2v-1.3b"]}, "different text encoders or VAEs"),
        ({"models": []}, "at least one preset"),
        ({"deployments": {"Decoder": {}}}, "unknown deployment ['Decoder']"),
        ({"checkpoints": {"tiny-i2v": {}}}, "checkpoints given for models not served"),
        ({"sla_topk": 0}, "greater than 0"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_name_the_rule(kwargs, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Settings(**kwargs)


def test_paths_become_absolute_for_replicas(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(storage_dir="out").with_absolute_paths()
    assert Path(settings.storage_dir) == tmp_path / "out"
    assert settings.resolved_job_store_url == f"sqlite:///{tmp_path / 'out' / 'jobs.sqlite3'}"
