import pytest

from turbo_serve.jobs.record import (
    ALLOWED_TRANSITIONS,
    IllegalTransition,
    JobError,
    JobRecord,
    JobState,
    denoise_progress,
)
from turbo_serve.pipeline.spec import GenerationSpec

HAPPY_PATH = [JobState.ENCODING, JobState.DENOISING, JobState.DECODING, JobState.COMPLETED]


def new_job() -> JobRecord:
    return JobRecord(id="video_1", spec=GenerationSpec(prompt="a cat"), created_at=100.0, entered_at={"queued": 100.0})


def test_happy_path_stamps_each_state_and_ends_at_100():
    job = new_job()
    for i, state in enumerate(HAPPY_PATH):
        job = job.transition(state, now=101.0 + i)
    assert job.state is JobState.COMPLETED and job.progress == 100
    assert job.entered_at == {"queued": 100.0, "encoding": 101.0, "denoising": 102.0, "decoding": 103.0, "completed": 104.0}
    assert job.finished_at == 104.0


@pytest.mark.parametrize("state", list(JobState))
def test_every_disallowed_transition_is_refused(state):
    # Walk to `state` by a legal route first.
    job = new_job()
    route = {
        JobState.QUEUED: [],
        JobState.ENCODING: HAPPY_PATH[:1],
        JobState.DENOISING: HAPPY_PATH[:2],
        JobState.DECODING: HAPPY_PATH[:3],
        JobState.COMPLETED: HAPPY_PATH,
        JobState.FAILED: [JobState.ENCODING, JobState.FAILED],
        JobState.CANCELLED: [JobState.CANCELLED],
    }[state]
    for step in route:
        job = job.transition(step)
    for target in JobState:
        if target in ALLOWED_TRANSITIONS[state]:
            assert job.transition(target).state is target
        else:
            with pytest.raises(IllegalTransition, match=f"from {state.value} to {target.value}"):
                job.transition(target)


def test_terminal_states_allow_nothing():
    for state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED):
        assert state.terminal and not ALLOWED_TRANSITIONS[state]


def test_api_status_is_openai_vocabulary():
    assert {s.api_status for s in JobState} == {"queued", "in_progress", "completed", "failed", "cancelled"}
    assert JobState.DENOISING.api_status == "in_progress"


def test_requeue_resets_progress_and_ownership():
    job = new_job().transition(JobState.ENCODING, owner="a", lease_expires_at=5.0).transition(JobState.DENOISING)
    job = job.with_progress(60)
    requeued = job.transition(JobState.QUEUED)
    assert (requeued.progress, requeued.owner, requeued.lease_expires_at) == (0, None, None)


def test_progress_only_moves_forward_and_is_bounded():
    job = new_job().transition(JobState.ENCODING).transition(JobState.DENOISING)
    assert job.with_progress(50).with_progress(20).progress == 50
    assert job.with_progress(500).progress == 100
    assert denoise_progress(0, 4) == 5 and denoise_progress(4, 4) == 95
    assert [denoise_progress(i, 4) for i in range(5)] == sorted(denoise_progress(i, 4) for i in range(5))


def test_round_trips_through_a_dict():
    job = new_job().transition(JobState.ENCODING).transition(
        JobState.FAILED, error=JobError("generation_failed", "boom")
    )
    assert JobRecord.from_dict(job.to_dict()) == job
