"""Every message between the broker, its workers and the CLI: plain frozen data, msgpack on the wire.

Commands to a worker are imperative (StartBinary); its reports are past tense (BinaryExited). Nothing
here does I/O. A frame we cannot decode raises ProtocolError; the receiver drops it and carries on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from visor.errors import ProtocolError

VERSION = 2                      # 2: runners outlive the broker (Welcome, Holding, HandOver)
UNKNOWN_EXIT = -1                # BinaryExited.exitcode of a binary whose parent was not the reporter
MAX_FRAME_BYTES = 1 << 20        # bigger frames are refused by the sockets themselves (ZMQ_MAXMSGSIZE)

# --- every worker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:                     # worker -> broker, first message; the name is also the socket identity
    kind: ClassVar[str] = "hello"
    name: str
    pid: int
    proto: int = VERSION         # decoded from any version (see decode): a broker can tell who it cannot command


@dataclass(frozen=True)
class Welcome:                   # broker -> a runner that outlived its broker: this is your broker now
    kind: ClassVar[str] = "welcome"
    broker_pid: int


@dataclass(frozen=True)
class Heartbeat:                 # worker -> broker, when it has said nothing for a while
    kind: ClassVar[str] = "heartbeat"


@dataclass(frozen=True)
class Shutdown:                  # broker -> worker: leave now
    kind: ClassVar[str] = "shutdown"


# --- upgrade watcher --------------------------------------------------------------------------


@dataclass(frozen=True)
class Watch:                     # broker -> upgrade-watcher: ask this node every interval
    kind: ClassVar[str] = "watch"
    socket_path: str
    http_path: str
    interval_ms: int


@dataclass(frozen=True)
class UpgradeStatus:             # upgrade-watcher -> broker: the node answered (sent when it changes)
    kind: ClassVar[str] = "upgrade_status"
    tag: str                     # "" when nothing is accepted
    height: int
    ready: bool


@dataclass(frozen=True)
class RpcFailed:                 # upgrade-watcher -> broker: one failed call
    kind: ClassVar[str] = "rpc_failed"
    error: str


# --- runners ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartBinary:               # broker -> runner
    kind: ClassVar[str] = "start_binary"
    path: str
    args: list[str]
    stop_timeout_s: float        # used if the runner must stop the binary on its own (broker gone)


@dataclass(frozen=True)
class AdoptBinary:               # broker -> a new runner whose predecessor died: supervise this pid
    kind: ClassVar[str] = "adopt_binary"
    pid: int
    path: str
    args: list[str]
    stop_timeout_s: float
    create_time: float = 0.0     # the runner refuses a pid that started at another time (reused)
    started_at: float = 0.0


@dataclass(frozen=True)
class HandOver:                  # broker -> runner (`visor restart`): leave without touching the binary
    kind: ClassVar[str] = "hand_over"


@dataclass(frozen=True)
class Detach:                    # broker -> a runner not its child (`visor restart`): keep the binary, load
    kind: ClassVar[str] = "detach"   # the code now installed (exec in place) and wait for the next broker


@dataclass(frozen=True)
class Holding:                   # runner -> broker, after each Hello: the binary it supervises
    kind: ClassVar[str] = "holding"
    name: str
    pid: int
    path: str
    args: list[str]
    started_at: float
    create_time: float
    exitcode: int | None = None  # set: it ended while no broker was up (-1: code unknown)
    stopping: bool = False       # a stop was under way (the runner enforces its SIGKILL deadline)


@dataclass(frozen=True)
class StopBinary:                # broker -> runner: SIGTERM its process group, SIGKILL after timeout_s
    kind: ClassVar[str] = "stop_binary"
    timeout_s: float


@dataclass(frozen=True)
class BinaryStarted:             # runner -> broker
    kind: ClassVar[str] = "binary_started"
    name: str
    pid: int
    path: str
    args: list[str]
    started_at: float            # wall time, for `status`
    create_time: float = 0.0     # the process's start time: with the pid, what names it for ever


@dataclass(frozen=True)
class StartFailed:               # runner -> broker: the binary could not be executed at all
    kind: ClassVar[str] = "start_failed"
    name: str
    error: str


@dataclass(frozen=True)
class BinaryExited:              # runner -> broker (or the broker's own reaper, for an orphan)
    kind: ClassVar[str] = "binary_exited"
    name: str
    pid: int
    exitcode: int                # negative: killed by that signal


@dataclass(frozen=True)
class QuerySegment:              # broker -> runner:data_node: ask the data node for its latest segment
    kind: ClassVar[str] = "query_segment"
    path: str
    args: list[str]              # the whole argv after the binary (see args.segment_query)


@dataclass(frozen=True)
class Segment:                   # runner:data_node -> broker
    kind: ClassVar[str] = "segment"
    height: int | None           # None: no history segments yet
    error: str = ""              # non-empty: the query failed


# --- fetcher ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepare:                   # broker -> fetcher: make `folder` ready for `tag`, downloading if allowed
    kind: ClassVar[str] = "prepare"
    tag: str
    folder: str                  # absolute path of the release folder
    current_run_config: str      # absolute path; the template for a downloaded folder's run-config
    fetch: bool                  # auto-install on: download when the folder is missing
    settings: dict[str, Any] = field(default_factory=dict)   # VisorConfig.fields() (autoInstall part used)


@dataclass(frozen=True)
class FolderReady:               # fetcher -> broker: run-config parses, binaries exist, version == tag
    kind: ClassVar[str] = "folder_ready"
    tag: str
    folder: str


@dataclass(frozen=True)
class FolderBlocked:             # fetcher -> broker: the folder is not usable, and why
    kind: ClassVar[str] = "folder_blocked"
    tag: str
    folder: str
    reason: str


@dataclass(frozen=True)
class FetchStarted:
    kind: ClassVar[str] = "fetch_started"
    tag: str
    asset: str


@dataclass(frozen=True)
class FetchProgress:             # at most a few per second
    kind: ClassVar[str] = "fetch_progress"
    tag: str
    asset: str
    bytes: int
    total: int


@dataclass(frozen=True)
class FetchCompleted:
    kind: ClassVar[str] = "fetch_completed"
    tag: str
    asset: str
    sha256: str


@dataclass(frozen=True)
class FetchFailed:
    kind: ClassVar[str] = "fetch_failed"
    tag: str
    asset: str
    error: str


# --- config watcher ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigLoaded:              # config-watcher -> broker: config.toml changed and is valid
    kind: ClassVar[str] = "config_loaded"
    values: dict[str, Any]       # VisorConfig.fields()
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConfigRejected:            # config-watcher -> broker: config.toml changed and is not valid
    kind: ClassVar[str] = "config_rejected"
    error: str                   # one line naming the file and the problem


# --- metrics (optional worker, when metricsListen is set) --------------------------------------


@dataclass(frozen=True)
class ServeMetrics:              # broker -> metrics: serve Prometheus metrics on `listen`
    kind: ClassVar[str] = "serve_metrics"
    listen: str                  # host:port
    events_endpoint: str         # the event stream it counts from
    control_endpoint: str        # where it asks for `status` at each scrape


# --- hooks (spawned on the first upgrade hook) -------------------------------------------------


@dataclass(frozen=True)
class RunHook:                   # broker -> hooks: run this program now; one at a time
    kind: ClassVar[str] = "run_hook"
    hook: str                    # beforeStop | afterStop | afterStart
    path: str                    # absolute
    args: list[str]
    timeout_s: float             # then SIGTERM to its process group, SIGKILL 5 s later
    # added to the worker's own environment: VISOR_HOOK, VISOR_HOME, VISOR_UPGRADE_TAG,
    # VISOR_UPGRADE_HEIGHT, VISOR_FROM_FOLDER, VISOR_TO_FOLDER
    env: dict[str, str]
    cwd: str                     # HOME


@dataclass(frozen=True)
class HookStarted:               # hooks -> broker
    kind: ClassVar[str] = "hook_started"
    hook: str
    pid: int                     # it leads its own process group (pgid == pid): if the hooks worker dies
                                 # mid-hook, the broker kills that group itself


@dataclass(frozen=True)
class HookFinished:              # hooks -> broker: exactly one per RunHook
    kind: ClassVar[str] = "hook_finished"
    hook: str
    ok: bool
    duration_ms: float
    exitcode: int | None = None  # None: it did not start, or timed out; negative: killed by that signal
    error: str = ""              # why it failed: "exited with code 3", "timed out after 60 s", "cannot start ..."


# --- control socket (CLI <-> broker) ----------------------------------------------------------


@dataclass(frozen=True)
class StatusRequest:
    kind: ClassVar[str] = "status_request"


@dataclass(frozen=True)
class StatusReply:
    kind: ClassVar[str] = "status_reply"
    status: dict[str, Any]


@dataclass(frozen=True)
class RestartRequest:            # CLI -> broker: re-execute in place (`visor restart`)
    kind: ClassVar[str] = "restart_request"


@dataclass(frozen=True)
class StopRequest:               # CLI -> broker: stop as SIGTERM does (`visor stop`)
    kind: ClassVar[str] = "stop_request"


@dataclass(frozen=True)
class Accepted:                  # broker -> CLI: the request is being carried out
    kind: ClassVar[str] = "accepted"
    pid: int


@dataclass(frozen=True)
class ErrorReply:                # broker -> CLI: the request was not understood
    kind: ClassVar[str] = "error_reply"
    error: str


Message = Any
MESSAGES: dict[str, type] = {m.kind: m for m in (
    Hello, Welcome, Heartbeat, Shutdown, Watch, UpgradeStatus, RpcFailed,
    StartBinary, AdoptBinary, HandOver, Detach, Holding, StopBinary, BinaryStarted, StartFailed, BinaryExited,
    QuerySegment, Segment,
    Prepare, FolderReady, FolderBlocked, FetchStarted, FetchProgress, FetchCompleted, FetchFailed,
    ConfigLoaded, ConfigRejected, ServeMetrics, StatusRequest, StatusReply, RestartRequest, StopRequest,
    Accepted, ErrorReply,
    RunHook, HookStarted, HookFinished,
)}


def encode(msg: Message) -> bytes:
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return msgpack.packb({"v": VERSION, "kind": msg.kind, **body})


def decode(frame: bytes) -> Message:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        if not isinstance(data, dict):
            raise TypeError("not a map")
        version = data.pop("v", None)
        if version != VERSION:
            if data.get("kind") == "hello":          # any version can say who it is
                return Hello(name=str(data["name"]), pid=int(data["pid"]), proto=int(version))
            raise ProtocolError(f"unsupported protocol version in {frame[:40]!r}")
        return MESSAGES[data.pop("kind")](**data)
    except ProtocolError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as err:
        raise ProtocolError(f"undecodable frame ({type(err).__name__}: {err})") from None
