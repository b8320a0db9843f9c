"""`Queue` (jobs/queue.py) is the only module that knows Redis keys and commands, with the
realtime hub (realtime/hub.py) for its pub/sub connection: no other module of the app builds a
key name from the prefix or calls a Redis command. A scan of the source, so a new leak fails
here rather than in review. And every Redis client, of the app and of `scripts/`, is made by
jobs/redis_clients.py, the one reader of `REDIS_URL` (a server or a Sentinel set)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("jobs", "realtime", "dashboard", "config")
OWNERS = {"jobs/queue.py", "realtime/hub.py"}
CLIENT_FACTORY = "jobs/redis_clients.py"
# What makes a redis-py client or pool: `Redis.from_url(...)`, `Redis(...)`, `Sentinel(...)`...
CONSTRUCTORS = frozenset(
    [
        "from_url",
        "from_pool",
        "master_for",
        "slave_for",
        "Redis",
        "StrictRedis",
        "Sentinel",
        "ConnectionPool",
    ]
)

# redis-py command methods. Names that are also common elsewhere (dict.get, Event.set,
# QuerySet.delete...) count only when called on something named like a Redis handle.
_COMMAND_NAMES = """
blmove blpop brpop bzpopmin decr decrby eval evalsha execute_command expire expireat
getdel getex getset hdel hexists hget hgetall hincrby hincrbyfloat hkeys hlen hmget hmset
hscan hset hsetnx hvals incr incrby incrbyfloat linsert llen lmove lpop lpos lpush lrange
lrem lset ltrim mget mset persist pexpire pexpireat pipeline psetex psubscribe pttl pubsub
register_script rpop rpoplpush rpush sadd scan_iter scard script_load setex setnx
sismember smembers smove spop srem sscan strlen ttl unlink xadd xrange xread zadd zcard
zcount zincrby zpopmax zpopmin zrange zrangebyscore zrank zrem zremrangebyrank
zremrangebyscore zrevrange zrevrangebyscore zscan zscore
"""
_AMBIGUOUS_NAMES = """
get set delete exists keys publish subscribe unsubscribe execute listen ping
get_message info scan type rename copy append
"""
COMMANDS = frozenset(_COMMAND_NAMES.split())
AMBIGUOUS = frozenset(_AMBIGUOUS_NAMES.split())
REDIS_HANDLE = re.compile(r"redis|client|pipe|pubsub", re.IGNORECASE)
# The Redis prefix in an f-string: `prefix`, `settings.JOBS["REDIS_PREFIX"]`, or the prefix of
# a queue, hub or self (not an API key's `key.prefix`, which is no Redis prefix).
REDIS_PREFIX = re.compile(r"^prefix$|REDIS_PREFIX|^(self|queue|hub|\w*queue\(\))\.prefix$")


def leaks(source: str) -> list[str]:
    """What of the source builds a Redis key or calls a Redis command, by line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr):
            for part, after in zip(node.values, node.values[1:], strict=False):
                if (
                    isinstance(part, ast.FormattedValue)
                    and REDIS_PREFIX.search(ast.unparse(part.value))
                    and isinstance(after, ast.Constant)
                    and str(after.value).startswith(":")
                ):
                    found.append((node.lineno, f"key name {ast.unparse(node)}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, receiver = node.func.attr, ast.unparse(node.func.value)
            if name == "key":
                found.append((node.lineno, f"key name {ast.unparse(node)}"))
            elif name in COMMANDS or (name in AMBIGUOUS and REDIS_HANDLE.search(receiver)):
                found.append((node.lineno, f"Redis command {ast.unparse(node)[:80]}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def constructions(source: str) -> list[str]:
    """The lines of the source that make a Redis client or connection pool."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in CONSTRUCTORS:
                found.append((node.lineno, ast.unparse(node)[:80]))
    return [f"{line}: {what}" for line, what in sorted(found)]


def app_modules(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    return sorted(
        path.relative_to(ROOT).as_posix()
        for package in packages
        for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts
    )


def test_only_the_factory_makes_redis_clients() -> None:
    found = {
        module: constructions((ROOT / module).read_text())
        for module in app_modules((*PACKAGES, "scripts"))
        if module != CLIENT_FACTORY
    }
    assert {module: lines for module, lines in found.items() if lines} == {}
    assert constructions((ROOT / CLIENT_FACTORY).read_text())


def test_the_scan_finds_each_way_of_making_a_client() -> None:
    source = """
def f(url, aioredis, redis, sentinel):
    redis.Redis.from_url(url)
    aioredis.Redis(host="h")
    Sentinel([("h", 1)]).master_for("m")
    redis.ConnectionPool.from_url(url)
"""
    assert [line.split(":")[0] for line in constructions(source)] == ["3", "4", "5", "5", "6"]


def test_only_the_queue_and_the_hub_know_redis_keys_and_commands() -> None:
    exempt = OWNERS
    found = {
        module: leaks((ROOT / module).read_text())
        for module in app_modules()
        if module not in exempt
    }
    assert {module: lines for module, lines in found.items() if lines} == {}


def test_the_scan_sees_the_owners_keys_and_commands() -> None:
    assert set(app_modules()) >= OWNERS
    for owner in OWNERS:
        assert leaks((ROOT / owner).read_text()), owner


def test_the_scan_finds_each_kind_of_leak() -> None:
    source = """
def f(queue, client, prefix, settings, cache, key):
    client.zadd(f"{prefix}:workers", {"w": 1})
    queue.client.pipeline(transaction=False)
    queue.key("lock", "x")
    client.get(f"{settings.JOBS['REDIS_PREFIX']}:login:user:x")
    cache.get("not redis")
    print(f"API key {key.prefix}: created")
"""
    assert [line.split(":")[0] for line in leaks(source)] == ["3", "3", "4", "5", "6", "6"]
