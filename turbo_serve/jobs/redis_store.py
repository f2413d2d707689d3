"""Redis job store, for applications spread over several hosts.

Each record is a JSON string; sorted sets and sets index it (creation order, queue, leases, finish
times, states). Every read-modify-write is an optimistic transaction (WATCH the record, compute the
new one with the same Python rules as every store, MULTI/EXEC the record and its index updates),
retried when another writer got there first, so the indexes never disagree with the records.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import redis

from turbo_serve.jobs.record import ACTIVE_STATES, JobRecord, JobState, QueueFull
from turbo_serve.jobs.store import JobStore, Order


class RedisJobStore(JobStore):
    def __init__(self, url: str, *, prefix: str = "turbo_serve"):
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10.0)
        self._prefix = prefix

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    def _job_key(self, job_id: str) -> str:
        return self._key("job", job_id)

    def _index(self, pipe, old: JobRecord | None, new: JobRecord | None, seq: int | None = None) -> None:
        """Queue the index changes that take `old` to `new` (None: absent) on a MULTI pipeline."""
        job_id = (new or old).id
        if old is not None:
            pipe.srem(self._key("state", old.state.value), job_id)
        if new is None:
            for name in ("order", "queued", "leases", "finished"):
                pipe.zrem(self._key(name), job_id)
            pipe.srem(self._key("active"), job_id)
            return
        pipe.sadd(self._key("state", new.state.value), job_id)
        if seq is not None:
            pipe.zadd(self._key("order"), {job_id: seq})
        if new.state is JobState.QUEUED:
            pipe.zadd(self._key("queued"), {job_id: seq if seq is not None else self._redis.zscore(self._key("order"), job_id)})
        else:
            pipe.zrem(self._key("queued"), job_id)
        if new.state.running and new.lease_expires_at is not None:
            pipe.zadd(self._key("leases"), {job_id: new.lease_expires_at})
        else:
            pipe.zrem(self._key("leases"), job_id)
        if new.state in ACTIVE_STATES:
            pipe.sadd(self._key("active"), job_id)
        else:
            pipe.srem(self._key("active"), job_id)
        if new.finished_at is not None:
            pipe.zadd(self._key("finished"), {job_id: new.finished_at})

    def _optimistic(self, keys: list[str], body: Callable):
        """Run body(pipe) with `keys` WATCHed; start over when another client changed one of them."""
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(*keys)
                    return body(pipe)
                except redis.WatchError:
                    continue

    def _insert(self, record: JobRecord, max_active: int | None) -> tuple[JobRecord, bool]:
        idem_key = self._key("idem", record.idempotency_key) if record.idempotency_key is not None else None

        def insert(pipe):
            if idem_key is not None:
                existing_id = pipe.get(idem_key)
                existing = self.get(existing_id) if existing_id is not None else None
                if existing is not None:
                    return existing, False
            if max_active is not None:
                active = pipe.scard(self._key("active"))
                if active >= max_active:
                    raise QueueFull(f"{active} unfinished jobs (limit {max_active})")
            seq = self._redis.incr(self._key("seq"))
            pipe.multi()
            pipe.set(self._job_key(record.id), json.dumps(record.to_dict()))
            if idem_key is not None:
                pipe.set(idem_key, record.id)
            self._index(pipe, None, record, seq=seq)
            pipe.execute()
            return record, True

        return self._optimistic([self._key("active"), *([idem_key] if idem_key else [])], insert)

    def get(self, job_id: str) -> JobRecord | None:
        data = self._redis.get(self._job_key(job_id))
        return None if data is None else JobRecord.from_dict(json.loads(data))

    def _update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        key = self._job_key(job_id)

        def update(pipe):
            data = pipe.get(key)
            if data is None:
                raise KeyError(job_id)
            old = JobRecord.from_dict(json.loads(data))
            new = change(old)
            pipe.multi()
            pipe.set(key, json.dumps(new.to_dict()))
            self._index(pipe, old, new)
            pipe.execute()
            return new

        return self._optimistic([key], update)

    def _queued_ids(self, limit: int) -> list[str]:
        return self._redis.zrange(self._key("queued"), 0, limit - 1)

    def _expired_lease_ids(self, now: float) -> list[str]:
        return self._redis.zrangebyscore(self._key("leases"), "-inf", f"({now}")

    def _finished_before(self, when: float) -> list[str]:
        return self._redis.zrangebyscore(self._key("finished"), "-inf", f"({when}")

    def _delete(self, job_id: str) -> None:
        key = self._job_key(job_id)

        def delete(pipe):
            data = pipe.get(key)
            if data is None:
                return
            old = JobRecord.from_dict(json.loads(data))
            pipe.multi()
            pipe.delete(key)
            if old.idempotency_key is not None:
                pipe.delete(self._key("idem", old.idempotency_key))
            self._index(pipe, old, None)
            pipe.execute()

        self._optimistic([key], delete)

    def list(self, *, after: str | None = None, limit: int = 20, order: Order = "desc") -> tuple[list[JobRecord], bool]:
        order_key = self._key("order")
        if after is None:
            bound = "+inf" if order == "desc" else "-inf"
        else:
            seq = self._redis.zscore(order_key, after)
            if seq is None:
                raise KeyError(after)
            bound = f"({seq}"
        if order == "desc":
            ids = self._redis.zrevrangebyscore(order_key, bound, "-inf", start=0, num=limit + 1)
        else:
            ids = self._redis.zrangebyscore(order_key, bound, "+inf", start=0, num=limit + 1)
        records = [r for r in (self.get(i) for i in ids[:limit]) if r is not None]
        return records, len(ids) > limit

    def counts(self) -> dict[str, int]:
        with self._redis.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.scard(self._key("state", state.value))
            return {state.value: n for state, n in zip(JobState, pipe.execute())}

    def ping(self, timeout_s: float = 5.0) -> None:
        """Wait until the server answers (tests start redis-server just before)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._redis.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._redis.close()
