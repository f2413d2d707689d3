import pytest

from turbo_serve.metrics import JobLabels, ServingMetrics, Stage
from turbo_serve.metrics.catalog import LATENCY_BUCKETS_S, resolution_class
from turbo_serve.metrics.recorder import MAX_VALUES_PER_LABEL, OTHER
from turbo_serve.pipeline.spec import GenerationSpec

LABELS = JobLabels("tiny-t2v", "480p", "sla")
JOB = {"model": "tiny-t2v", "resolution": "480p", "attention_type": "sla"}


@pytest.fixture
def metrics():
    m = ServingMetrics()
    assert m.backend == "local"  # no ray.init() in this process: samples go to our own registry
    return m


def test_stage_durations_land_in_the_stage_histogram(metrics):
    metrics.observe_stage(Stage.DENOISE, 42.0, LABELS)
    metrics.observe_stage("decode", 0.015, LABELS)
    denoise = {**JOB, "stage": "denoise"}
    assert metrics.sample("ray_turbo_stage_seconds_count", denoise) == 1
    assert metrics.sample("ray_turbo_stage_seconds_sum", denoise) == 42.0
    assert metrics.sample("ray_turbo_stage_seconds_bucket", {**denoise, "le": "30.0"}) == 0
    assert metrics.sample("ray_turbo_stage_seconds_bucket", {**denoise, "le": "60.0"}) == 1
    assert metrics.sample("ray_turbo_stage_seconds_bucket", {**JOB, "stage": "decode", "le": "0.02"}) == 1


def test_buckets_span_ten_ms_to_thirty_minutes(metrics):
    assert LATENCY_BUCKETS_S[0] == 0.01 and LATENCY_BUCKETS_S[-1] == 1800.0
    assert list(LATENCY_BUCKETS_S) == sorted(set(LATENCY_BUCKETS_S))
    metrics.observe_job(1500.0, LABELS)
    assert metrics.sample("ray_turbo_job_e2e_seconds_bucket", {**JOB, "le": "1800.0"}) == 1
    assert metrics.sample("ray_turbo_job_e2e_seconds_bucket", {**JOB, "le": "1200.0"}) == 0


def test_time_stage_records_finished_blocks_only(metrics):
    with metrics.time_stage(Stage.TEXT_ENCODE, LABELS):
        pass
    with pytest.raises(RuntimeError):
        with metrics.time_stage(Stage.TEXT_ENCODE, LABELS):
            raise RuntimeError("encoder crashed")
    assert metrics.sample("ray_turbo_stage_seconds_count", {**JOB, "stage": "text_encode"}) == 1


def test_step_timer_records_one_sample_per_step(metrics):
    on_step = metrics.step_timer(LABELS)
    for done in range(1, 5):
        on_step(done, 4)
    assert metrics.sample("ray_turbo_dit_step_seconds_count", JOB) == 4


def test_outcomes_rejections_validation_and_cache_counts(metrics):
    metrics.count_finished("completed", LABELS)
    metrics.count_finished("completed", LABELS)
    metrics.count_finished("failed", LABELS)
    metrics.count_rejected("tiny-t2v")
    metrics.count_validation_error("num_frames")
    metrics.count_text_cache(True, "tiny-t2v")
    metrics.count_text_cache(False, "tiny-t2v")
    assert metrics.sample("ray_turbo_jobs_finished_total", {**JOB, "outcome": "completed"}) == 2
    assert metrics.sample("ray_turbo_jobs_finished_total", {**JOB, "outcome": "failed"}) == 1
    assert metrics.sample("ray_turbo_jobs_rejected_total", {"model": "tiny-t2v"}) == 1
    assert metrics.sample("ray_turbo_validation_errors_total", {"field": "num_frames"}) == 1
    assert metrics.sample("ray_turbo_text_cache_lookups_total", {"model": "tiny-t2v", "result": "hit"}) == 1


def test_jobs_by_state_resets_states_that_emptied(metrics):
    metrics.set_jobs_by_state({"queued": 3, "denoising": 1})
    metrics.set_jobs_by_state({"denoising": 2})
    assert metrics.sample("ray_turbo_jobs_by_state", {"state": "queued"}) == 0
    assert metrics.sample("ray_turbo_jobs_by_state", {"state": "denoising"}) == 2
    assert metrics.sample("ray_turbo_jobs_by_state", {"state": "decoding"}) == 0


def test_unknown_enum_values_name_the_valid_ones(metrics):
    with pytest.raises(ValueError, match="stage must be one of text_encode, negative_encode, image_encode, denoise"):
        metrics.observe_stage("vae", 1.0, LABELS)
    with pytest.raises(ValueError, match="outcome must be one of completed, failed, cancelled"):
        metrics.count_finished("timeout", LABELS)
    with pytest.raises(ValueError, match="jobstate must be one of queued"):
        metrics.set_jobs_by_state({"completed": 1})
    with pytest.raises(ValueError, match="backend must be one of auto, ray, local"):
        ServingMetrics(backend="statsd")


def test_free_form_label_values_are_capped(metrics):
    for i in range(MAX_VALUES_PER_LABEL + 5):
        metrics.count_validation_error(f"field_{i}")
    metrics.count_validation_error("a prompt with spaces and {braces}")
    assert metrics.sample("ray_turbo_validation_errors_total", {"field": "field_0"}) == 1
    assert metrics.sample("ray_turbo_validation_errors_total", {"field": f"field_{MAX_VALUES_PER_LABEL}"}) is None
    assert metrics.sample("ray_turbo_validation_errors_total", {"field": OTHER}) == 6


def test_labels_from_a_spec_use_resolution_classes():
    spec = GenerationSpec(prompt="a cat", model="wan2.1-t2v-1.3b", width=832, height=480, attention_type="sla")
    assert JobLabels.for_spec(spec) == JobLabels("wan2.1-t2v-1.3b", "480p", "sla")
    assert resolution_class(1280, 720) == "720p" and resolution_class(720, 1280) == "720p"
    assert resolution_class(848, 464) == "480p"  # an adaptive I2V size keeps its class
    assert resolution_class(64, 64) == "below_480p"
    assert resolution_class(1920, 1088) == "above_720p"
