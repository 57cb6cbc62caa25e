"""Settings of `matcher serve`: a TOML file, then environment variables on top.

Every setting has an environment name, `MATCHER_<SECTION>_<KEY>` (for example
`MATCHER_SERVER_PORT=8081`, `MATCHER_REDIS_URL=redis://...`). The file and the
environment are converted into typed Structs by msgspec, so a wrong setting fails at
start with its path (`$.server.port`), not later.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta, Struct

from matcher.engine import Segment
from matcher.participants import Directory, Participant, hash_key
from matcher.protocol import NewId, Role, error_path
from matcher.types import MAX_RESTING
from service.forwarded import Header as ForwardedHeader

Durability = Literal["always", "everysec", "no"]


class _Section(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    # Seconds for in-flight journal writes. Every duration has a finite bound: TOML has
    # `inf`, and a shutdown that waited for ever for a Redis that is down never exited.
    shutdown_timeout: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    # SCHED_RR at this priority (1-99) for the gateway and the local Redis it starts; 0:
    # the normal policy. Halves the p99 on a busy 2-core machine (README, ADR 14).
    realtime_priority: Annotated[int, Meta(ge=0, le=99)] = 0
    # After a start, funders with cancel on disconnect have this long to reconnect; then
    # the resting orders of those still away are cancelled (their quotes would be stale).
    reconnect_grace_s: Annotated[float, Meta(ge=0, le=86_400)] = 30.0
    # A WebSocket ping after this long without a message; no pong within half of it and
    # the connection is closed (and a funder's bids cancelled): how soon a dead peer shows.
    heartbeat_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    # Reverse proxies whose `forwarded_header` is believed: their own addresses (or a
    # network only they use, not one their clients are in, who could forge the header).
    # Behind them the client's address is the last one they did not add, so that
    # per-address limits are per client, not per proxy (service/forwarded.py).
    # In the environment: comma-separated.
    trusted_proxies: list[str] = []
    # The header those proxies append the client's address to: "x-forwarded-for" or
    # "forwarded" (RFC 7239's `for=`). One, never both: a proxy that appends to one passes
    # the other on as the client wrote it, and reading it would let the client choose
    # its address (ADR 22, addendum).
    forwarded_header: ForwardedHeader = "x-forwarded-for"
    # A scrape of /metrics within this long of the one before gets the same text: making
    # it takes the event loop a few ms with thousands of connections, and /metrics takes
    # no key. 0: every scrape reads afresh.
    metrics_cache_ms: Annotated[int, Meta(ge=0, le=60_000)] = 1_000


class RedisConfig(_Section):
    url: str | None = None          # None: start a local redis-server under `data_dir`
    data_dir: str = "var/redis"
    local_port: Annotated[int, Meta(ge=0, le=65535)] = 6379   # for that one; if busy: any
    shard: NewId = "main"
    durability: Durability = "always"
    max_retry_delay: Annotated[float, Meta(gt=0, le=60)] = 1.0
    # Journal writes sent before the previous one returned. 1 suits a Redis on the same
    # few cores (each write costs CPU there); more helps when Redis is a network hop away.
    writes_in_flight: Annotated[int, Meta(ge=1, le=64)] = 1
    # Ask Redis to rewrite its append-only file after the end of day (BGREWRITEAOF), so
    # that its own automatic rewrites (a fork and a full write) do not fall in trading
    # hours; give a remote Redis a large auto-aof-rewrite-min-size too (README).
    rewrite_at_end_of_day: bool = True
    # The writer lease (ADR 31): how long it lasts unrenewed (renewed every fifth of it).
    # A start waits this long, and a little more, for the lease of a gateway of another
    # host killed without its shutdown; the holder's loop may stall this long before
    # another start may take the shard over from it.
    writer_lease_s: Annotated[float, Meta(ge=1, le=300)] = 10.0


class EngineConfig(_Section):
    snapshot_every: Annotated[int, Meta(ge=1)] = 100_000
    # Start `matcher snapshotter` beside the gateway. Off: run it elsewhere (another
    # machine: it needs only Redis), or do without periodic snapshots.
    start_snapshotter: bool = True
    # A directory: once a snapshot is stored, the snapshotter moves the journal before
    # it from Redis to files here (service/archive.py, ADR 20), so Redis's memory holds
    # about one snapshot interval of commands. Empty: the journal stays whole in Redis.
    journal_archive: str = ""
    # Fills older than this (in journal time) leave Redis's fill stream and participants'
    # streams (checked by the snapshotter every tenth of the window, at most every ten
    # minutes of journal time), except fills a consumer group has not acknowledged
    # (service/retention.py, ADR 21). The journal gives them back by replay. 0: keep all.
    fill_retention_hours: Annotated[float, Meta(ge=0, le=876_000)] = 0.0     # 100 years
    end_of_day: Annotated[str, Meta(pattern=r"^([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?$")] = "16:30"
    timezone: str = "Asia/Shanghai"


class LimitsConfig(_Section):
    max_frame_bytes: Annotated[int, Meta(ge=256)] = 64 * 1024
    outbox_bytes: Annotated[int, Meta(ge=1)] = 4 * 2**20  # unsent, per connection
    rate: Annotated[float, Meta(gt=0, le=1e9)] = 5_000.0       # messages per second per connection
    burst: Annotated[int, Meta(ge=1)] = 10_000
    book_interval_ms: Annotated[int, Meta(ge=0)] = 50
    journal_backlog: Annotated[int, Meta(ge=1)] = 200_000
    auth_timeout: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    # WebSocket connections waiting for their `auth` message, all clients together.
    unauthenticated_connections: Annotated[int, Meta(ge=1)] = 1_000
    # WebSocket upgrades a second from one address (IPv6: one /64; behind
    # `trusted_proxies`, the client's), and their burst. Each costs the loop about half a
    # millisecond, signed in or refused, so one client connecting again and again could
    # stall it (found in an audit). A reconnect storm from behind one NAT (every board
    # after a restart) passes its first `connect_burst` at once, the rest at the rate.
    connect_rate: Annotated[float, Meta(gt=0, le=1e9)] = 200.0
    connect_burst: Annotated[int, Meta(ge=1)] = 2_000
    # Open at once with one key: each has its own rate budget, so without a cap one
    # participant could open thousands and multiply its rate by as many.
    connections_per_participant: Annotated[int, Meta(ge=1)] = 32
    # Orders one participant may have resting (IOC and FOK asks never rest).
    resting_orders_per_participant: Annotated[int, Meta(ge=1)] = 10_000
    # Orders resting in one segment, everyone's together: at most MAX_RESTING, so that
    # no sum the book forms can leave int64 (ADR 4, addendum).
    resting_orders_per_segment: Annotated[int, Meta(ge=1, le=MAX_RESTING)] = 1_000_000


class SegmentConfig(_Section):
    id: NewId
    core: NewId
    tenor_days: Annotated[int, Meta(ge=1, le=3660)]
    rate_cap_bps: Annotated[int, Meta(ge=1, le=10_000)] = 3600

    def segment(self) -> Segment:
        return Segment(id=self.id, core=self.core, tenor_days=self.tenor_days,
                       rate_cap_bps=self.rate_cap_bps)


class ParticipantConfig(_Section):
    """`key` (plain, for demos and tests) or `key_sha256`; the plain key is hashed at load."""

    id: Annotated[int, Meta(ge=1)]
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    role: Role
    key: Annotated[str, Meta(min_length=1)] | None = None
    # What `sha256sum` prints: 64 lower-case hex digits (a key pasted here instead, or
    # an upper-case digest, would load and never sign anyone in).
    key_sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")] | None = None
    cancel_on_disconnect: bool = True

    def __post_init__(self) -> None:
        # At load, with the participant's path (msgspec adds it).
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"participant {self.name!r} needs exactly one of key, "
                             "key_sha256")


class DemoConfig(_Section):
    """Generated participants with predictable keys, and opening credit lines and bids."""

    funders: Annotated[int, Meta(ge=0)] = 0
    smes: Annotated[int, Meta(ge=0)] = 0
    key_prefix: str = "demo"
    credit_line: Annotated[int, Meta(ge=0)] = 0       # fen, per funder and core enterprise
    seed_bids: bool = False
    # Demo funders keep their bids when they go away: the seeded bids are theirs, and
    # nobody runs them (with cancel on disconnect, the restart grace would clear them).
    cancel_on_disconnect: bool = False
    # Commands a second from `matcher demo-market`, which `serve` starts beside it: demo
    # funders re-quote, demo SMEs finance, and the platform repays each loan
    # `repay_after_s` later (service/demo_market.py). 0: the market moves only when
    # someone acts.
    activity: Annotated[float, Meta(ge=0, le=1000)] = 0.0
    repay_after_s: Annotated[float, Meta(gt=0, le=31_536_000)] = 60.0


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    segments: list[SegmentConfig] = []
    participants: list[ParticipantConfig] = []
    demo: DemoConfig = msgspec.field(default_factory=DemoConfig)

    def all_participants(self) -> list[Participant]:
        out = []
        for p in self.participants + demo_participants(self.demo):
            digest = p.key_sha256 or hash_key(p.key or "")
            out.append(Participant(id=p.id, name=p.name, role=p.role, key_sha256=digest,
                                   cancel_on_disconnect=p.cancel_on_disconnect))
        return out


#: Demo participants' ids: funders from 1001, SMEs from 100001.
DEMO_FUNDER_BASE, DEMO_SME_BASE = 1000, 100_000


def demo_key(demo: DemoConfig, role: Role, n: int) -> str:
    return f"{demo.key_prefix}-{role}-{n}"


def demo_participants(demo: DemoConfig) -> list[ParticipantConfig]:
    out = [ParticipantConfig(id=DEMO_FUNDER_BASE + n, name=f"Funder {n}", role="funder",
                             key=demo_key(demo, "funder", n),
                             cancel_on_disconnect=demo.cancel_on_disconnect)
           for n in range(1, demo.funders + 1)]
    out += [ParticipantConfig(id=DEMO_SME_BASE + n, name=f"SME {n}", role="sme",
                              key=demo_key(demo, "sme", n)) for n in range(1, demo.smes + 1)]
    return out


_SECTIONS = ("server", "redis", "engine", "limits", "demo")
#: Variables of ours that are not settings of the server: `matcher admin`'s key, and the
#: build's switches (setup.py). An operator who exported the key for `matcher admin`
#: could not start the gateway from that shell (found in review).
_NOT_SETTINGS = frozenset({"MATCHER_ADMIN_KEY", "MATCHER_DEBUG", "MATCHER_ANNOTATE"})


def _env_overrides(data: dict[str, Any], environ: dict[str, str],
                   sources: dict[str, str]) -> dict[str, Any]:
    """The file's settings with the environment's over them; `sources` gets the JSON
    path of each setting the environment gave, and the variable's name."""
    # A name outside the sections (a typo, or `[[segments]]`, which the environment
    # cannot give) would be ignored without a word, and the setting not be what the
    # operator thinks; a wrong key inside a section is an unknown field, reported below.
    stray = sorted(name for name in environ if name.startswith("MATCHER_")
                   and name not in _NOT_SETTINGS
                   and not name.startswith(tuple(f"MATCHER_{s.upper()}_" for s in _SECTIONS)))
    if stray:
        raise msgspec.ValidationError(
            f"{stray[0]}: not a setting; environment variables set "
            f"MATCHER_<{'|'.join(s.upper() for s in _SECTIONS)}>_<KEY> "
            "(segments and participants only in the file)")
    for section in _SECTIONS:
        prefix = f"MATCHER_{section.upper()}_"
        for name, value in environ.items():
            if name.startswith(prefix):
                key = name[len(prefix):].lower()
                sources[f"$.{section}.{key}"] = name
                data.setdefault(section, {})[key] = \
                    [v.strip() for v in value.split(",") if v.strip()] \
                    if (section, key) in _LISTS else value
    return data


#: Settings that are lists: comma-separated in the environment.
_LISTS = {("server", "trusted_proxies")}


def load(path: str | Path | None, environ: dict[str, str] | None = None) -> Config:
    """Read the file (or the packaged demo when `path` is None), then the environment."""
    text = (Path(path).read_text() if path is not None
            else resources.files("service").joinpath("demo.toml").read_text())
    sources: dict[str, str] = {}
    data = _env_overrides(tomllib.loads(text), dict(os.environ if environ is None else environ),
                          sources)
    try:
        return _checked(data)
    except msgspec.ValidationError as exc:
        # A setting the environment gave is not in the file the operator reads.
        path = error_path(str(exc))
        name = next((sources[p] for p in (path, path.partition("[")[0]) if p in sources),
                    None)
        if name is None:
            raise
        raise msgspec.ValidationError(f"{exc} (set by the environment variable {name})"
                                      ) from None


#: What redis-py connects to (a URL of another scheme raised from inside the start).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _repeated(ids: list[Any]) -> int | None:
    """The index of the first id given before it in `ids`, if any."""
    seen: set[Any] = set()
    for i, value in enumerate(ids):
        if value in seen:
            return i
        seen.add(value)
    return None


def _check_participants(cfg: Config) -> None:
    """Each participant's id, by its path, and then the directory the gateway builds
    from them with the demo's (ids of the demo's, keys shared): these were checked only
    once the start had begun, and refused with a traceback (found in an audit)."""
    i = _repeated([p.id for p in cfg.participants])
    if i is not None:
        raise msgspec.ValidationError(f"id {cfg.participants[i].id} is given twice - at "
                                      f"`$.participants[{i}].id`")
    try:
        Directory(cfg.all_participants())
    except ValueError as exc:
        raise msgspec.ValidationError(f"{exc} - at `$.participants`") from None


def _checked(data: dict[str, Any]) -> Config:
    """The settings as a Config, each checked: raises ValidationError naming the path."""
    # strict=False: environment values are strings ("8081" -> 8081).
    cfg = msgspec.convert(data, Config, strict=False)
    i = _repeated([seg.id for seg in cfg.segments])
    if i is not None:
        raise msgspec.ValidationError(f"segment {cfg.segments[i].id!r} is configured twice "
                                      f"- at `$.segments[{i}].id`")
    for i, proxy in enumerate(cfg.server.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError as exc:
            raise msgspec.ValidationError(
                f"{exc} - at `$.server.trusted_proxies[{i}]`") from None
    if cfg.redis.url is not None and not cfg.redis.url.strip():
        raise msgspec.ValidationError("empty: give a redis:// URL, or leave the setting "
                                      "out to start a local Redis - at `$.redis.url`")
    if cfg.redis.url is not None and not cfg.redis.url.startswith(REDIS_SCHEMES):
        raise msgspec.ValidationError(
            f"{cfg.redis.url.partition('://')[0]!r} is not a Redis URL: it starts with "
            f"{', '.join(REDIS_SCHEMES)} - at `$.redis.url`")
    _check_participants(cfg)
    try:                    # here, not at the end of a start that recovered and snapshot
        ZoneInfo(cfg.engine.timezone)
    except (ValueError, OSError, ZoneInfoNotFoundError):    # OSError: "America", a dir
        raise msgspec.ValidationError(f"unknown time zone {cfg.engine.timezone!r} - at "
                                      "`$.engine.timezone`") from None
    return cfg
