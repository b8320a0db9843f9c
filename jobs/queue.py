"""The Redis side of the service, and the one module that knows Redis keys and commands.

PostgreSQL is the source of truth; the queue index here can be lost and rebuilt by
reconciliation, the rest (limits, budgets, counters) is short-lived or advisory. Key layout
(P is `JOBS_REDIS_PREFIX`), built by `Keys` here and by jobs/lua/_common.lua in the scripts,
documented in docs/architecture.md:

The queue index: JOBS_QUEUE_SHARDS shards, each under its hash tag {q<k>} (one cluster slot); a
tenant belongs to shard crc32(tenant) % N (`Keys.shard_of`). <x> marks a placeholder.
    P:{q<k>}:ready:<tenant>      ZSET  job id -> ready score (priority band, then enqueue time)
    P:{q<k>}:tenants             LIST  ring of the shard's tenants that have ready jobs
    P:{q<k>}:active              SET   tenants currently in the ring (each at most once)
    P:{q<k>}:delayed             ZSET  "<tenant>|<ready score>|<job id>" -> due time (ms)
    P:{q<k>}:processing:<worker> HASH  job id -> "<tenant>|<ready score>" claimed by that worker
    P:{q<k>}:running             HASH  tenant -> jobs claimed and not yet released (all workers)
    P:{q<k>}:limits              HASH  tenant -> concurrency limit (absent: unlimited)
    P:{q<k>}:workers             ZSET  the shard's copy of P:workers (for the fair share)
    P:{q<k>}:slots               HASH  worker name -> its concurrency (their sum: all slots)
    P:{q<k>}:slots:total         STRING the sum, cached by the claim script for one second
Workers
    P:workers             ZSET  worker name -> last heartbeat (ms)
    P:wake                LIST  wake-up tokens for idle workers (BLPOP)
    P:cancel              pub/sub channel: ids of RUNNING jobs to cancel
    P:lock:<name>         STRING short-lived locks (reconciliation)
Limits and budgets (a tenant's keys share the hash tag {t:<tenant>})
    P:{t:<tenant>}:rate   STRING rate limit state (GCRA arrival time), expires when idle
    P:{t:<tenant>}:email-recipients        ZSET "<token>:<recipients>" -> when accepted (ms)
    P:{t:<tenant>}:email-recipients:total  STRING recipients in the tenant's window
    P:{t:<tenant>}:replay HASH  the tenant's bucket of WebSocket replay rows ("tokens", "at")
    P:ws:procs            ZSET  API process -> when its socket counts expire (ms)
    P:ws:proc:<process>   HASH  "total", "t:<tenant>", "k:<key digest>" -> open sockets
    P:login:user:<name>   STRING failed logins of a user name in the throttle's window
    P:login:addr:<address> STRING failed logins from a client address in that window
Destination protection (webhook requests; jobs/destinations.py)
    P:host:<host>:slots   ZSET  request holder -> lease expiry (ms): requests in flight to a host
    P:host:<host>:breaker HASH  the host's circuit breaker: state, failures, until, probe, ...
    P:circuits            ZSET  host -> until (ms), for hosts whose circuit is open or half-open
Metrics (jobs/counters.py computes the fields; counters, so they never expire)
    P:metrics:events      HASH  "<event>|<type>|<tenant>" -> count
    P:metrics:duration    HASH  "<type>|<bucket>" -> count, "<type>|sum", "<type>|count"
    P:metrics:wait        HASH  the same layout, for the time from runAt to start

With REDIS_CLUSTER_URL, `client` is a Redis Cluster holding the queue index, workers, locks,
tenant keys and metrics; `plain` (REDIS_URL) keeps the pub/sub channels, the socket counts,
destination protection and the login throttle, whose scripts span slots.

The job update channels (P:updates:<tenant>) and P:auth belong to the realtime hub
(realtime/hub.py), the process's one subscriber.

Three kinds of methods, by who calls them:
- the operations both the API (`redis.Redis`) and the worker (`redis.asyncio.Redis`) call
  (`enqueue`, `claim`, `release`, `requeue`, `remove`, `beat`, `rate_limit`,
  `spend_email_recipients`, `acquire_host`, `release_host`, ...) return what the client
  returns: a value, or an awaitable of it. The `parse_*` functions next to them turn a reply
  into a typed result;
- reads and writes only the API's synchronous code needs (`ready_counts`, `queue_depths`,
  `worker_beats`, `job_event_metrics`, `open_sockets`, `open_circuits`, the login throttle)
  want a sync client and return typed results;
- what only a worker or the realtime path needs (`wait_for_wake`, `try_lock`, `dead_workers`,
  `cancel_requests`, `record_starts`, `record_outcomes`, the socket counts, the replay budget)
  are coroutines: they want an asyncio client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

from jobs import counters
from jobs.models import PRIORITY_MAX, PRIORITY_MIN, Job
from jobs.redis_clients import async_cluster, async_redis, sync_cluster, sync_redis
from realtime.hub import auth_channel

LUA_DIR = Path(__file__).with_name("lua")
AnyClient = redis.Redis | aioredis.Redis | redis.RedisCluster | aioredis.RedisCluster
# Ready scores order a tenant's jobs by priority band, then by creation time in microseconds
# since SCORE_EPOCH. 21 bands x 4e14 us stays below 2**53, exact in a Redis double, until 2036.
SCORE_EPOCH_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
SCORE_BAND_US = 400_000_000_000_000
# Constants the scripts share, passed to them as arguments:
WAKE_TOKENS_MAX = 256  # wake-up tokens waiting at most (enqueue, claim, requeue)
CLAIM_TTL_S = 86_400  # a processing hash outlives its worker's last claim or heartbeat by this


def ready_score(*, priority: int, created_at: datetime) -> int:
    """Lower runs first: higher priority, then older job (FIFO within a priority)."""
    priority = max(PRIORITY_MIN, min(PRIORITY_MAX, priority))
    created_us = int(created_at.timestamp() * 1_000_000) - SCORE_EPOCH_US
    return (PRIORITY_MAX - priority) * SCORE_BAND_US + max(0, min(created_us, SCORE_BAND_US - 1))


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """What Redis needs to know of a runnable job."""

    tenant: str
    job_id: str
    score: int
    run_at_ms: int


def entry_for(job: Job) -> QueueEntry:
    """The queue entry of a job row (its ready score and due time)."""
    return QueueEntry(
        tenant=job.tenant_id,
        job_id=str(job.id),
        score=ready_score(priority=job.priority, created_at=job.created_at),
        run_at_ms=int(job.run_at.timestamp() * 1000),
    )


# --- typed results ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Claimed:
    """Ids a worker took from the ready sets, and when the next delayed job is due."""

    job_ids: list[str]
    next_due_ms: int | None


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The rate limit's answer: allowed, or how many ms until the same request would be."""

    allowed: bool
    retry_ms: int


@dataclass(frozen=True, slots=True)
class RecipientBudget:
    """The email budget's answer: allowed, the recipients now in the tenant's window, and how
    many ms until enough of them have left it (when refused)."""

    allowed: bool
    total: int
    retry_ms: int


@dataclass(frozen=True, slots=True)
class QueueDepths:
    """The whole queue at a glance (the /metrics gauges)."""

    ready: int
    delayed: int
    running: int
    workers_alive: int
    tenants_ready: int


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """A registered worker and its last heartbeat."""

    name: str
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class CapReached:
    """A socket refused: the counter (`t:{tenant}` or `k:{key digest}`) at its cap, and the
    sockets open under it over every live API process."""

    field: str
    open: int


@dataclass(frozen=True, slots=True)
class ReplayGrant:
    """Rows granted from a replay budget, and ms until one is available again (if none was)."""

    granted: int
    retry_ms: int


@dataclass(frozen=True, slots=True)
class HostPass:
    """The destination guard's answer: go ahead (`probe` if this request tests a half-open
    circuit), or not before `retry_at_ms` (0: when a slot frees, soon) because of `reason`:
    `open` (circuit open), `probing` (a probe is out) or `busy` (the host's cap is reached)."""

    granted: bool
    probe: bool = False
    reason: str = ""
    retry_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Circuit:
    """A host whose circuit breaker is not closed: `open` until `until` (then the next request
    probes), or `half_open` (a probe is out or may go)."""

    host: str
    state: str
    until: datetime
    failures: int
    opened_at: datetime | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_cluster_enabled(raw: Mapping[str, Any]) -> bool:
    return str(raw.get("cluster_enabled", 0)) == "1"


def parse_claim(raw: list[Any]) -> Claimed:
    ids, next_due, *_ = raw
    return Claimed(
        job_ids=[_text(i) for i in ids],
        next_due_ms=int(next_due) if next_due not in (None, b"", "", False, -1, b"-1") else None,
    )


def parse_rate_limit(raw: Sequence[Any]) -> RateDecision:
    """The reply of `Queue.rate_limit`."""
    allowed, retry_ms = raw
    return RateDecision(allowed=bool(int(allowed)), retry_ms=int(retry_ms))


def parse_host_pass(raw: Sequence[Any]) -> HostPass:
    """The reply of `Queue.acquire_host`."""
    granted, what, *rest = raw
    if int(granted):
        return HostPass(granted=True, probe=_text(what) == "probe")
    return HostPass(granted=False, reason=_text(what), retry_at_ms=int(rest[0]) if rest else 0)


def parse_email_budget(raw: Sequence[Any]) -> RecipientBudget:
    """The reply of `Queue.spend_email_recipients`."""
    allowed, total, retry_ms = (int(value) for value in raw)
    return RecipientBudget(allowed=bool(allowed), total=total, retry_ms=retry_ms)


# --- keys and scripts -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Keys:
    """Every key name of the layout above. The scripts build the same names from the prefix
    and the shard or tenant base they are given (jobs/lua/_common.lua): change both together.

    The queue index is split into `shards` queue shards, each under its own hash tag
    (`P:{q<k>}`), a tenant belonging to shard `crc32(tenant) % shards`; a tenant's own keys
    (rate limit, budgets) share the tag `{t:<tenant>}`. So each script touches one slot."""

    prefix: str
    shards: int = 1

    def of(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- queue shards -------------------------------------------------------------------------
    def shard(self, k: int) -> str:
        """The base of queue shard `k` (KEYS[1] of the queue's scripts)."""
        return f"{self.prefix}:{{q{k}}}"

    def shard_of(self, tenant: str) -> int:
        """The queue shard of a tenant: a stable hash, the same in every process."""
        return zlib.crc32(tenant.encode()) % self.shards if self.shards > 1 else 0

    def ready(self, tenant: str) -> str:
        return f"{self.shard(self.shard_of(tenant))}:ready:{tenant}"

    def ring(self, k: int = 0) -> str:
        return f"{self.shard(k)}:tenants"

    def active(self, k: int = 0) -> str:
        return f"{self.shard(k)}:active"

    def delayed(self, k: int = 0) -> str:
        return f"{self.shard(k)}:delayed"

    def processing(self, worker: str, k: int = 0) -> str:
        return f"{self.shard(k)}:processing:{worker}"

    def running(self, k: int = 0) -> str:
        return f"{self.shard(k)}:running"

    def limits(self, k: int = 0) -> str:
        return f"{self.shard(k)}:limits"

    def shard_workers(self, k: int = 0) -> str:
        """The shard's copy of the live workers (the claim script's fair share reads it)."""
        return f"{self.shard(k)}:workers"

    def shard_slots(self, k: int = 0) -> str:
        """The shard's copy of every worker's concurrency."""
        return f"{self.shard(k)}:slots"

    def slots_total(self, k: int = 0) -> str:
        """Their sum, cached by the shard's claims for a second."""
        return f"{self.shard(k)}:slots:total"

    # --- a tenant's own keys ------------------------------------------------------------------
    def tenant(self, tenant: str) -> str:
        """The base of a tenant's keys (KEYS[1] of its scripts)."""
        return f"{self.prefix}:{{t:{tenant}}}"

    def rate(self, tenant: str) -> str:
        return f"{self.tenant(tenant)}:rate"

    def email_recipients(self, tenant: str) -> str:
        return f"{self.tenant(tenant)}:email-recipients"

    def email_recipients_total(self, tenant: str) -> str:
        return f"{self.tenant(tenant)}:email-recipients:total"

    def replay(self, tenant: str) -> str:
        return f"{self.tenant(tenant)}:replay"

    # --- one key each -------------------------------------------------------------------------
    @property
    def workers(self) -> str:
        return self.of("workers")

    @property
    def wake(self) -> str:
        return self.of("wake")

    @property
    def cancel(self) -> str:
        return self.of("cancel")

    def lock(self, name: str) -> str:
        return self.of("lock", name)

    @property
    def ws_procs(self) -> str:
        return self.of("ws", "procs")

    def ws_proc(self, process: str) -> str:
        return self.of("ws", "proc", process)

    def metrics(self, name: counters.MetricHash) -> str:
        return self.of("metrics", name)

    def host_slots(self, host: str) -> str:
        return self.of("host", host, "slots")

    def host_breaker(self, host: str) -> str:
        return self.of("host", host, "breaker")

    @property
    def circuits(self) -> str:
        return self.of("circuits")

    def login_user(self, username: str) -> str:
        return self.of("login", "user", username)

    def login_addr(self, address: str) -> str:
        return self.of("login", "addr", address)


@cache
def _lua(name: str) -> str:
    """A script's source with the shared helpers of `_common.lua` in front."""
    return (LUA_DIR / "_common.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()


def increments_of(keys: Keys, event: str, jobs: Iterable[Job]) -> list[tuple[str, str, int]]:
    """(key, field, amount) HINCRBYs that count `event` for the jobs (`Queue.enqueue`'s
    `counters`)."""
    key = keys.metrics("events")
    return [(key, name, n) for name, n in counters.event_fields(event, jobs).items()]


class Queue:
    """Operations on Redis, each one atomic (a Lua script, a single command or a MULTI) unless
    it says otherwise."""

    def __init__(
        self,
        client: AnyClient,
        prefix: str | None = None,
        *,
        plain: AnyClient | None = None,
        shards: int | None = None,
    ) -> None:
        # `client` holds the queue (a Redis Cluster with REDIS_CLUSTER_URL); `plain` is the
        # Redis of REDIS_URL, for pub/sub and what stays off the cluster (socket counts,
        # destination protection, the login throttle). The same client when there is no cluster.
        self.client = client
        self.plain = plain if plain is not None else client
        self.cluster = isinstance(client, redis.RedisCluster | aioredis.RedisCluster)
        self.is_async = isinstance(client, aioredis.Redis | aioredis.RedisCluster)
        self.prefix = prefix or settings.JOBS["REDIS_PREFIX"]
        self.shards: int = shards or settings.JOBS["QUEUE_SHARDS"]
        self.keys = Keys(self.prefix, self.shards)
        # The shard each id a worker claimed came from (worker -> id -> shard), so a release
        # goes to that shard only; an id not known here is looked for in every shard.
        self._claimed: dict[str, dict[str, int]] = {}
        # The shard the next claim starts at (one further at every claim).
        self.next_shard = random.randrange(self.shards)
        self.fair_share: float = settings.JOBS["TENANT_FAIR_SHARE"]
        self.fair_share_reserve: int = settings.JOBS["TENANT_FAIR_SHARE_RESERVE"]
        # The index's scripts, registered up front: a subclass may replace one (the FIFO
        # baseline of bench/fairness.py). The others are registered on first use.
        self._enqueue = client.register_script(_lua("enqueue"))
        self._claim = client.register_script(_lua("claim"))
        self._release = client.register_script(_lua("release"))
        self._requeue = client.register_script(_lua("requeue"))
        self._remove = client.register_script(_lua("remove"))
        self._rate_limit = client.register_script(_lua("rate_limit"))
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str) -> Any:
        """jobs/lua/{name}.lua on this client (EVALSHA; registered on first use)."""
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(_lua(name))
        return script

    @property
    def wake_max(self) -> int:
        """The scripts' cap on wake-up tokens. On a cluster they leave the tokens alone (P:wake
        is in another slot): the methods push them after the script (`_wake`)."""
        return 0 if self.cluster else WAKE_TOKENS_MAX

    def _plain_script(self, name: str) -> Any:
        """jobs/lua/{name}.lua on the plain client (scripts that span keys of several slots)."""
        script = self._scripts.get(f"plain:{name}")
        if script is None:
            script = self._scripts[f"plain:{name}"] = self.plain.register_script(_lua(name))
        return script

    def _drive(self, steps: Generator[Any, Any, Any]) -> Any:
        """Run an operation of several calls written once as a generator that yields each call's
        reply (a value or an awaitable) and gets its result back (or its error raised there):
        with a sync client the result, with an asyncio client an awaitable of it (what the
        one-call methods return too)."""
        if self.is_async:

            async def run() -> Any:
                try:
                    reply = next(steps)
                    while True:
                        try:
                            result = await reply
                        except Exception as exc:  # the steps may carry on without that call
                            reply = steps.throw(exc)
                        else:
                            reply = steps.send(result)
                except StopIteration as done:
                    return done.value

            return run()
        try:
            reply = next(steps)
            while True:
                reply = steps.send(reply)
        except StopIteration as done:
            return done.value

    def _wake(self, n: int) -> Any:
        """Push up to `n` wake-up tokens (on a cluster; the scripts do it on one Redis)."""
        n = min(n, WAKE_TOKENS_MAX)
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(self.keys.wake, *(["1"] * n))
        pipe.ltrim(self.keys.wake, 0, WAKE_TOKENS_MAX - 1)
        pipe.expire(self.keys.wake, 60)
        return pipe.execute()

    def _wake_steps(self, n: int) -> Generator[Any, Any, None]:
        """`_wake` as a step that cannot fail the operation: the work is done, and idle workers
        look again within a second anyway."""
        with contextlib.suppress(redis.RedisError):
            yield self._wake(n)

    def _by_claim_shard(self, worker: str, job_ids: Iterable[str]) -> dict[int, list[str]]:
        """Ids a worker claimed, by the shard they came from (unknown ones: in every shard)."""
        known = self._claimed.get(worker, {})
        found: dict[int, list[str]] = {}
        for job_id in job_ids:
            shard = known.pop(job_id, None) if self.shards > 1 else 0
            for k in range(self.shards) if shard is None else (shard,):
                found.setdefault(k, []).append(job_id)
        return found

    # --- keys (for callers not yet moved to methods: the worker's files) ----------------------
    def key(self, *parts: str) -> str:
        return self.keys.of(*parts)

    @property
    def wake_key(self) -> str:
        return self.keys.wake

    @property
    def cancel_channel(self) -> str:
        return self.keys.cancel

    @property
    def workers_key(self) -> str:
        return self.keys.workers

    # --- producers (either client) ------------------------------------------------------------
    def enqueue(
        self,
        entries: Iterable[QueueEntry],
        *,
        publish: Iterable[tuple[str, str]] = (),
        counters: Iterable[tuple[str, str, int]] = (),
    ) -> Any:
        """Index jobs (due ones into their tenant's ready set, later ones into the delayed set),
        then PUBLISH each (channel, message) and add each (key, field, amount). Returns how
        many went to the ready sets. One atomic call on one Redis with one shard; on a cluster,
        one call per shard, then the counters, then the publishes (on the plain Redis)."""
        by_shard: dict[int, list[QueueEntry]] = {}
        for entry in entries:
            by_shard.setdefault(self.keys.shard_of(entry.tenant), []).append(entry)
        return self._drive(self._enqueue_steps(by_shard, list(publish), list(counters)))

    def _enqueue_steps(
        self,
        by_shard: dict[int, list[QueueEntry]],
        publishes: list[tuple[str, str]],
        increments: list[tuple[str, str, int]],
    ) -> Generator[Any, Any, int]:
        ready = 0
        if not self.cluster:
            shards = list(by_shard.items()) or [(0, [])]
            for i, (k, batch) in enumerate(shards):
                last = i == len(shards) - 1
                args = self._enqueue_args(
                    batch, publishes if last else [], increments if last else []
                )
                ready += int((yield self._enqueue(keys=[self.keys.shard(k)], args=args)))
            return ready
        for k, batch in by_shard.items():
            args = self._enqueue_args(batch, [], [])
            ready += int((yield self._enqueue(keys=[self.keys.shard(k)], args=args)))
        delayed = sum(len(batch) for batch in by_shard.values()) - ready
        if ready or delayed:
            yield from self._wake_steps(ready + min(delayed, 1))
        if increments:
            pipe = self.client.pipeline(transaction=False)
            for key, field, amount in increments:
                pipe.hincrby(key, field, amount)
            yield pipe.execute()
        if publishes:
            pipe = self.plain.pipeline(transaction=False)
            for channel, message in publishes:
                pipe.publish(channel, message)
            yield pipe.execute()
        return ready

    def _enqueue_args(
        self,
        entries: Sequence[QueueEntry],
        publishes: Sequence[tuple[str, str]],
        increments: Sequence[tuple[str, str, int]],
    ) -> list[str | int]:
        args: list[str | int] = [self.prefix, self.wake_max, len(entries)]
        for entry in entries:
            args.extend((entry.tenant, entry.job_id, entry.score, entry.run_at_ms))
        args.append(len(publishes))
        for channel, message in publishes:
            args.extend((channel, message))
        for key, field, amount in increments:
            args.extend((key, field, amount))
        return args

    def event_increments(self, event: str, jobs: Iterable[Job]) -> list[tuple[str, str, int]]:
        """The `counters` argument of `enqueue` that counts `event` for the jobs."""
        return increments_of(self.keys, event, jobs)

    def remove(self, entries: Iterable[QueueEntry]) -> Any:
        """Take jobs out of the ready and delayed sets (a cancelled job never runs)."""
        by_shard: dict[int, list[str | int]] = {}
        for entry in entries:
            args = by_shard.setdefault(self.keys.shard_of(entry.tenant), [self.prefix])
            args.extend((entry.tenant, entry.job_id, entry.score))
        return self._drive(self._sum(self._remove, by_shard))

    def _sum(
        self, script: Any, by_shard: Mapping[int, Sequence[str | int]]
    ) -> Generator[Any, Any, int]:
        """Run `script` on each shard with its arguments; the sum of the replies."""
        total = 0
        for k, args in by_shard.items():
            total += int((yield script(keys=[self.keys.shard(k)], args=list(args))))
        return total

    def rate_limit(self, *, tenant: str, rate: int, burst: int, cost: int) -> Any:
        """GCRA for job creation: returns [allowed (1/0), ms until `cost` would be allowed]
        (`parse_rate_limit`)."""
        args = [self.prefix, tenant, rate, burst, cost]
        return self._rate_limit(keys=[self.keys.tenant(tenant)], args=args)

    def spend_email_recipients(self, *, tenant: str, limit: int, cost: int, window_ms: int) -> Any:
        """Add `cost` recipients to the tenant's sliding window if its total stays within
        `limit`: returns [allowed, total, retry ms] (`parse_email_budget`)."""
        args = [self.prefix, tenant, limit, cost, window_ms, uuid.uuid4().hex]
        return self._script("email_recipients")(keys=[self.keys.tenant(tenant)], args=args)

    def acquire_host(
        self, *, host: str, holder: str, limit: int, lease_ms: int, cooldown_ms: int
    ) -> Any:
        """A slot for one request to `host` unless its circuit is open or `limit` requests are
        in flight; the slot expires after `lease_ms` if never released (`parse_host_pass`)."""
        args = [self.prefix, host, holder, limit, lease_ms, cooldown_ms]
        return self._plain_script("host_acquire")(keys=[], args=args)

    def release_host(
        self,
        *,
        host: str,
        holder: str,
        verdict: str,
        failures_to_open: int,
        cooldown_ms: int,
        keep_ms: int,
    ) -> Any:
        """Give back `holder`'s slot and count the request (`ok`, `failed` or `none`) in the
        host's circuit breaker; returns the circuit's state (`closed`, `open`, `half_open`)."""
        args = [self.prefix, host, holder, verdict, failures_to_open, cooldown_ms, keep_ms]
        return self._plain_script("host_release")(keys=[], args=args)

    def publish_cancel(self, job_id: str) -> Any:
        return self.plain.publish(self.keys.cancel, job_id)

    def announce_auth_change(self, tenant_id: str) -> Any:
        """Tell every API process's hub (P:auth) that a tenant's keys or settings changed."""
        return self.plain.publish(auth_channel(self.prefix), tenant_id)

    def ping(self) -> Any:
        return self.client.ping()

    def cluster_info(self) -> Any:
        """`INFO cluster` of the plain Redis (`parse_cluster_enabled`): whether REDIS_URL names
        a Redis Cluster node, which cannot carry the pub/sub and the plain keys (a cluster is
        given by REDIS_CLUSTER_URL)."""
        return self.plain.info("cluster")

    def set_tenant_limit(self, tenant: str, limit: int | None) -> Any:
        key = self.keys.limits(self.keys.shard_of(tenant))
        if limit is None:
            return self.client.hdel(key, tenant)
        return self.client.hset(key, tenant, limit)

    def replace_tenant_limits(self, limits: dict[str, int]) -> Any:
        """Make the limits hashes equal to `limits` (tenant -> max jobs running): atomically on
        one Redis, shard by shard on a cluster."""
        by_shard: dict[int, dict[str, int]] = {k: {} for k in range(self.shards)}
        for tenant, limit in limits.items():
            by_shard[self.keys.shard_of(tenant)][tenant] = limit
        pipe = self.client.pipeline(transaction=not self.cluster)
        for k, mapping in by_shard.items():
            pipe.delete(self.keys.limits(k))
            if mapping:
                pipe.hset(self.keys.limits(k), mapping=mapping)
        return pipe.execute()

    # --- workers (either client) --------------------------------------------------------------
    def beat(self, *, worker: str, slots: int) -> Any:
        """Mark a worker alive now with its concurrency (its part of the cluster's slots, which
        fair shares are taken of; each shard keeps a copy), and keep its claims from expiring:
        one round trip (one per node on a cluster)."""
        now = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=not self.cluster)
        pipe.zadd(self.keys.workers, {worker: now})
        for k in range(self.shards):
            pipe.zadd(self.keys.shard_workers(k), {worker: now})
            pipe.hset(self.keys.shard_slots(k), worker, slots)
            pipe.expire(self.keys.processing(worker, k), CLAIM_TTL_S)
        return pipe.execute()

    def claim(self, *, worker: str, count: int) -> Any:
        """Take up to `count` ids, one tenant per turn round robin, a tenant over its fair share
        only when no other tenant yields a job; due delayed jobs first move (`parse_claim`).
        With several shards: shard by shard, starting one further at each call, until `count`
        are taken; tenants over their share get slots only once every shard was asked. A shard
        that cannot be reached is skipped (an error only if none can)."""
        return self._drive(self._claim_steps(worker, count))

    def _claim_steps(self, worker: str, count: int) -> Generator[Any, Any, list[Any]]:
        start = self.next_shard
        self.next_shard = (start + 1) % self.shards
        ids: list[str] = []
        next_due: int | None = None
        unlent: list[int] = []
        failed: list[redis.RedisError] = []
        order = [(start + i) % self.shards for i in range(self.shards)]
        # First every shard without lending, then the shards that passed a tenant over.
        for lend, shards in ((1 if self.shards == 1 else 0, order), (1, unlent)):
            for k in shards:
                if len(ids) >= count:
                    break
                args = [
                    self.prefix,
                    worker,
                    count - len(ids),
                    self.wake_max,
                    self.fair_share,
                    self.fair_share_reserve,
                    CLAIM_TTL_S,
                    lend,
                ]
                try:
                    got, due, *passed = yield self._claim(keys=[self.keys.shard(k)], args=args)
                except redis.RedisError as exc:
                    # A shard whose node is failing over: serve the others meanwhile.
                    if self.shards == 1:
                        raise
                    failed.append(exc)
                    continue
                taken = [_text(i) for i in got]
                if taken and self.shards > 1:
                    self._claimed.setdefault(worker, {}).update(dict.fromkeys(taken, k))
                ids.extend(taken)
                if int(due) >= 0:
                    next_due = int(due) if next_due is None else min(next_due, int(due))
                if passed and int(passed[0]):
                    unlent.append(k)
        if len(failed) == len(order):
            raise failed[0]
        if self.cluster and ids and len(ids) >= count:
            yield from self._wake_steps(1)  # jobs may be left behind: another idle worker looks
        return [ids, -1 if next_due is None else next_due]

    def release(self, *, worker: str, job_ids: Iterable[str]) -> Any:
        """Forget ids a worker has finished with (or failed to claim in the database)."""
        by_shard = {
            k: [self.prefix, worker, *ids]
            for k, ids in self._by_claim_shard(worker, job_ids).items()
        }
        return self._drive(self._sum(self._release, by_shard))

    def requeue(self, *, worker: str, job_ids: Iterable[str] | None = None) -> Any:
        """Put a worker's claimed ids back in the ready sets: all of them if `job_ids` is None
        (which also forgets the worker)."""
        return self._drive(self._requeue_steps(worker, job_ids))

    def _requeue_steps(
        self, worker: str, job_ids: Iterable[str] | None
    ) -> Generator[Any, Any, int]:
        if job_ids is None:
            self._claimed.pop(worker, None)
            by_shard = {k: [self.prefix, worker, "all", self.wake_max] for k in range(self.shards)}
        else:
            by_shard = {
                k: [self.prefix, worker, "some", *ids, self.wake_max]
                for k, ids in self._by_claim_shard(worker, job_ids).items()
            }
        requeued = yield from self._sum(self._requeue, by_shard)
        if job_ids is None:
            yield self.client.zrem(self.keys.workers, worker)
        if self.cluster and requeued:
            yield from self._wake_steps(requeued)
        return requeued

    # --- workers (asyncio client) -------------------------------------------------------------
    async def wait_for_wake(self, timeout_s: float) -> bool:
        """Block until a wake-up token arrives or `timeout_s` passes; True if one was taken."""
        # BLPOP's timeout has a resolution of 1 ms in Redis >= 6 (0 would block for ever).
        return await self.client.blpop([self.keys.wake], timeout=max(timeout_s, 0.001)) is not None

    async def try_lock(self, name: str, *, owner: str, ttl_s: float) -> bool:
        """Take the lock `name` for `ttl_s` unless someone holds it (it is never released: it
        expires)."""
        px = max(1, int(ttl_s * 1000))
        return bool(await self.client.set(self.keys.lock(name), owner, nx=True, px=px))

    async def dead_workers(self, *, silent_since_ms: int) -> list[str]:
        """Registered workers whose last heartbeat is at or before `silent_since_ms`."""
        names = await self.client.zrangebyscore(self.keys.workers, "-inf", silent_since_ms)
        return [_text(name) for name in names]

    async def cancel_requests(self) -> AsyncIterator[str]:
        """Ids of RUNNING jobs the API asks to cancel, as they are published (not those published
        before the subscription). Its own connection, closed when the iteration ends (use
        `contextlib.aclosing` to end it early); connection errors propagate, the caller
        subscribes again."""
        pubsub = self.plain.pubsub()
        try:
            await pubsub.subscribe(self.keys.cancel)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield _text(message["data"])
        finally:
            await pubsub.aclose()

    async def record_starts(self, jobs: Sequence[Job]) -> None:
        """Time how long each claimed job waited from due to start (one pipelined round trip)."""
        await self._add(counters.start_increments(jobs))

    async def record_outcomes(self, jobs: Sequence[Job], now: datetime) -> None:
        """Count written outcomes (completed, failed, retried, cancelled) and time the finished
        attempts (one pipelined round trip)."""
        await self._add(counters.outcome_increments(jobs, now))

    async def record_holds(self, jobs: Sequence[Job]) -> None:
        """Count attempts held back by destination protection (one pipelined round trip)."""
        await self._add(counters.hold_increments(jobs))

    async def _add(self, increments: counters.Increments) -> None:
        if not increments:
            return
        pipe = self.client.pipeline(transaction=False)
        for (metric, name), amount in increments.counts.items():
            pipe.hincrby(self.keys.metrics(metric), name, amount)
        for (metric, name), amount in increments.sums.items():
            pipe.hincrbyfloat(self.keys.metrics(metric), name, amount)
        await pipe.execute()

    # --- reads for the API, the admin, the dashboard and /metrics (sync client) ---------------
    def ready_counts(self, tenant_ids: Sequence[str]) -> dict[str, int]:
        """Jobs in each tenant's ready set (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for tenant_id in tenant_ids:
            pipe.zcard(self.keys.ready(tenant_id))
        return dict(zip(tenant_ids, (int(n) for n in pipe.execute()), strict=True))

    def queue_depths(self, *, alive_since_ms: int) -> QueueDepths:
        """Jobs ready, delayed and claimed, workers that beat at or after `alive_since_ms`, and
        tenants with ready jobs, over every shard (two round trips)."""
        pipe = self.client.pipeline(transaction=False)
        for k in range(self.shards):
            pipe.smembers(self.keys.active(k))
        tenants = [_text(t) for members in pipe.execute() for t in members]
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.zcard(self.keys.ready(tenant))
        for k in range(self.shards):
            pipe.zcard(self.keys.delayed(k))
            pipe.hvals(self.keys.running(k))
        pipe.zcount(self.keys.workers, alive_since_ms, "+inf")
        *replies, workers = pipe.execute()
        ready, per_shard = replies[: len(tenants)], replies[len(tenants) :]
        return QueueDepths(
            ready=sum(ready),
            delayed=sum(int(n) for n in per_shard[0::2]),
            running=sum(int(n) for hvals in per_shard[1::2] for n in hvals),
            workers_alive=int(workers),
            tenants_ready=len(tenants),
        )

    def worker_beats(self) -> list[WorkerBeat]:
        """Every registered worker with its last heartbeat, oldest first."""
        return [
            WorkerBeat(name=_text(name), last_seen=datetime.fromtimestamp(score / 1000, UTC))
            for name, score in self.client.zrange(self.keys.workers, 0, -1, withscores=True)
        ]

    def job_event_metrics(self) -> counters.EventMetrics:
        """The counters and histograms every process adds to (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.metrics("events"))
        pipe.hgetall(self.keys.metrics("duration"))
        pipe.hgetall(self.keys.metrics("wait"))
        events, durations, waits = pipe.execute()
        return counters.EventMetrics(
            events=counters.parse_events(events),
            durations=counters.parse_histograms(durations),
            waits=counters.parse_histograms(waits),
        )

    def open_sockets(self) -> int:
        """Open WebSockets over every live API process."""
        return int(self._plain_script("ws_count")(keys=[], args=[self.prefix, "total"]))

    def open_circuits(self) -> list[Circuit]:
        """Hosts whose circuit breaker is open or half-open, soonest to retry first (two round
        trips; a host whose breaker state expired is dropped from the list)."""
        hosts = [
            (_text(host), score)
            for host, score in self.plain.zrange(self.keys.circuits, 0, -1, withscores=True)
        ]
        if not hosts:
            return []
        pipe = self.plain.pipeline(transaction=False)
        for host, _ in hosts:
            pipe.hgetall(self.keys.host_breaker(host))
        found: list[Circuit] = []
        gone: list[str] = []
        for (host, score), raw in zip(hosts, pipe.execute(), strict=True):
            state = {_text(k): _text(v) for k, v in raw.items()}
            if state.get("state") not in ("open", "half_open"):
                gone.append(host)
                continue
            opened = int(state.get("opened_at") or 0)
            found.append(
                Circuit(
                    host=host,
                    state=state["state"],
                    until=datetime.fromtimestamp(int(state.get("until") or score) / 1000, UTC),
                    failures=int(state.get("failures") or 0),
                    opened_at=datetime.fromtimestamp(opened / 1000, UTC) if opened else None,
                )
            )
        if gone:
            self.plain.zrem(self.keys.circuits, *gone)
        return found

    # --- login throttle (sync client) ---------------------------------------------------------
    def login_failures(self, *, username: str, address: str | None) -> int:
        """Failed logins counted in the window for the user name or the client address,
        whichever has more."""
        counts = self.plain.mget(self._login_keys(username, address))
        return max((int(count) for count in counts if count is not None), default=0)

    def count_login_failure(self, *, username: str, address: str | None, window_s: int) -> None:
        """Count a failed login for the user name and the address, each for `window_s` from
        now (one round trip)."""
        pipe = self.plain.pipeline(transaction=False)
        for key in self._login_keys(username, address):
            pipe.incr(key)
            pipe.expire(key, window_s)
        pipe.execute()

    def clear_login_failures(self, *, username: str) -> None:
        """Forget the failed logins of a user name (not those of the addresses it came from)."""
        self.plain.delete(self.keys.login_user(username))

    def _login_keys(self, username: str, address: str | None) -> list[str]:
        keys = [self.keys.login_user(username)]
        if address:
            keys.append(self.keys.login_addr(address))
        return keys

    # --- realtime: open sockets and replay budget (asyncio client) ----------------------------
    async def admit_socket(
        self, *, process: str, ttl_ms: int, tenant_cap: int, key_cap: int, fields: Sequence[str]
    ) -> CapReached | None:
        """Count a socket under `fields` in `process`'s counts (which live `ttl_ms`), unless a
        field's sum over the live processes is at its cap (0: none): then say which."""
        admitted, *refused = await self._plain_script("ws_admit")(
            keys=[], args=[self.prefix, process, ttl_ms, tenant_cap, key_cap, *fields]
        )
        if admitted:
            return None
        return CapReached(field=_text(refused[0]), open=int(refused[1]))

    async def release_socket(self, *, process: str, fields: Sequence[str]) -> None:
        """Stop counting a closed socket under `fields` ("total" included)."""
        await self._plain_script("ws_release")(keys=[], args=[self.prefix, process, *fields])

    async def sync_sockets(self, *, process: str, ttl_ms: int, counts: Mapping[str, int]) -> None:
        """Replace `process`'s counts by `counts` for `ttl_ms` (none: forget the process)."""
        pairs = [str(part) for item in counts.items() for part in item]
        await self._plain_script("ws_sync")(keys=[], args=[self.prefix, process, ttl_ms, *pairs])

    async def take_replay_rows(
        self, *, tenant: str, rate: int, burst: int, wanted: int
    ) -> ReplayGrant:
        """Take up to `wanted` rows from the tenant's bucket (`burst` rows, refilled at `rate`
        per second); a negative `wanted` gives rows back."""
        granted, retry_ms = await self._script("replay_budget")(
            keys=[self.keys.tenant(tenant)], args=[self.prefix, tenant, rate, burst, wanted]
        )
        return ReplayGrant(granted=int(granted), retry_ms=int(retry_ms))


@cache
def sync_client() -> redis.Redis:
    """The API process's client of REDIS_URL (a connection pool shared by its threads)."""
    return sync_redis(
        settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30
    )


@cache
def sync_cluster_client() -> redis.RedisCluster | None:
    """The API process's client of REDIS_CLUSTER_URL, if set."""
    if not settings.REDIS_CLUSTER_URL:
        return None
    return sync_cluster(settings.REDIS_CLUSTER_URL, socket_timeout=2, socket_connect_timeout=2)


def sync_queue() -> Queue:
    return Queue(sync_cluster_client() or sync_client(), plain=sync_client())


_async_queues: dict[asyncio.AbstractEventLoop, Queue] = {}


def async_queue() -> Queue:
    """The running event loop's queue on redis-py's asyncio client (the API's hot paths)."""
    loop = asyncio.get_running_loop()
    queue = _async_queues.get(loop)
    if queue is None or queue.prefix != settings.JOBS["REDIS_PREFIX"]:
        for old in [key for key in _async_queues if key.is_closed()]:
            del _async_queues[old]
        plain = async_redis(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30
        )
        client: AnyClient = plain
        if settings.REDIS_CLUSTER_URL:
            client = async_cluster(
                settings.REDIS_CLUSTER_URL, socket_timeout=2, socket_connect_timeout=2
            )
        queue = _async_queues[loop] = Queue(client, plain=plain)
    return queue


async def close_async_queue() -> None:
    """Close the running loop's clients, if any (tests, which run one loop per test)."""
    queue = _async_queues.pop(asyncio.get_running_loop(), None)
    if queue is not None:
        await queue.client.aclose()
        if queue.plain is not queue.client:
            await queue.plain.aclose()
