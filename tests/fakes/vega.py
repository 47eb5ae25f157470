#!/usr/bin/env python3
"""A fake `vega` executable: core node, admin JSON-RPC API and data node in one stdlib script.

Tests install it next to a VERSION file (tests/fakes/__init__.py) and run it as `<folder>/vega ARGS`
under `python -S`: it must import nothing outside the standard library and start fast.

  vega version --output json                            {"version": <VERSION>, "hash": "fake"}
  vega node [OPTIONS]   |   vega datanode start [OPTIONS]   a long-running node ("node mode")
  vega [datanode] network-history latest-history-segment --output json [--home H]

Node-mode options; any other argument is accepted and ignored, because Visor appends its own flags:
  --log FILE           append one JSON line per event: started, serving, rpc, stopped, crashed, ...
  --crash-after S      exit with --exit-code N (default 1) S seconds after starting
  --ignore-sigterm     survive SIGTERM and SIGINT; only SIGKILL ends it
  --admin-socket PATH  serve the admin API on this Unix socket, at --admin-path (default /rpc)
  --upgrade-file FILE  upgrade state, re-read on every call: {"tag", "height", "ready", "reply", "null_info"}
  --serve-after S      open the admin socket only S seconds after starting

Files in the executable's folder steer the one-shot commands: VERSION, VERSION_FAIL, SEGMENT (a
height, or any text to print as is), SEGMENT_FAIL, SEGMENT_STRICT; segment-queries.log records calls.
"""
import json
import os
import signal
import sys
import time

# abspath, not realpath: run as HOME/current/vega, the folder is HOME/current, as Visor sees it.
FOLDER = os.path.dirname(os.path.abspath(sys.argv[0]))
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
NO_SEGMENTS = "no history segments found"
_sockets = []  # admin sockets this process created, removed again on the way out


def main(argv):
    if argv[:1] == ["version"]:
        return version(argv[1:])
    rest = argv[1:] if argv[:1] == ["datanode"] else argv
    if rest[:2] == ["network-history", "latest-history-segment"]:
        return latest_segment(argv)
    if argv[:1] == ["node"]:
        return node("node", argv[1:])
    if argv[:2] == ["datanode", "start"]:
        return node("datanode", argv[2:])
    print(f"vega (fake): unknown command {argv!r}", file=sys.stderr)
    return 1


def _in_folder(name):
    return os.path.join(FOLDER, name)


def _wants_json(args):
    pairs = zip(args, args[1:] + [""])
    return "--output=json" in args or ("--output", "json") in pairs


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"))  # compact, as Go's encoding/json writes


def version(args):
    if os.path.exists(_in_folder("VERSION_FAIL")):
        print("boom", file=sys.stderr)
        return 3
    try:
        with open(_in_folder("VERSION")) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        tag = "v0.0.0"
    print(_dumps({"version": tag, "hash": "fake"}) if _wants_json(args) else f"Vega CLI {tag} (fake)")
    return 0


def latest_segment(argv):
    _append_line(_in_folder("segment-queries.log"),
                 {"event": "segment-query", "argv": argv, "pid": os.getpid(), "t": time.time()})
    if os.path.exists(_in_folder("SEGMENT_FAIL")):
        print("database locked", file=sys.stderr)
        return 2
    try:
        with open(_in_folder("SEGMENT")) as f:
            text = f.read().strip()
    except FileNotFoundError:
        # The real data node's handleErr prints this JSON on stdout and exits 1; the Go visor finds
        # the words in its error text, which holds stdout and stderr. SEGMENT_STRICT keeps stdout only.
        print(_dumps({"error": NO_SEGMENTS}))
        if not os.path.exists(_in_folder("SEGMENT_STRICT")):
            print(NO_SEGMENTS, file=sys.stderr)
        return 1
    try:
        height = int(text)
    except ValueError:
        print(text)  # malformed output on purpose
        return 0
    # encoding/json of latestHistoryOutput{LatestSegment *v2.HistorySegment}: the outer key has no
    # json tag (so "LatestSegment"), the protobuf fields are snake_case with omitempty.
    segment = {"from_height": max(1, height - 299), "to_height": height,
               "history_segment_id": f"QmFakeSegment{height:012d}",
               "previous_history_segment_id": f"QmFakeSegment{max(0, height - 300):012d}"}
    if _wants_json(argv):
        print(_dumps({"LatestSegment": segment}))
    else:
        print(f"Latest segment to use data {segment}")
    return 0


def _append_line(path, record):
    # O_APPEND plus one write per line: concurrent fakes never interleave inside a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _parse_node_args(args):
    import argparse
    p = argparse.ArgumentParser(prog="vega", add_help=False, allow_abbrev=False)
    p.add_argument("--log")
    p.add_argument("--crash-after", type=float)
    p.add_argument("--exit-code", type=int, default=1)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--admin-socket")
    p.add_argument("--admin-path", default="/rpc")
    p.add_argument("--upgrade-file")
    p.add_argument("--serve-after", type=float, default=0.0)
    opts, _ignored = p.parse_known_args(args)
    return opts


def node(mode, args):
    # Stop signals stay blocked in every thread (the admin threads inherit the mask): the main thread
    # takes them with sigtimedwait, so one always comes after "started" in the log. Not a handler: the
    # kernel may hand a process-wide signal to any thread that does not block it (the admin server
    # spawning a connection thread, say), and CPython runs a handler only once its main thread wakes,
    # here from a sleep of an hour; Visor's SIGKILL came first.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    opts = _parse_node_args(args)

    def log(event, **fields):
        if opts.log:
            _append_line(opts.log, {"event": event, "pid": os.getpid(), **fields,
                                    "t": time.time(), "t_mono": time.monotonic()})

    log("started", argv=sys.argv[1:], mode=mode, folder=FOLDER)  # first: benchmarks read its t_mono
    started_mono = time.monotonic()

    if opts.crash_after is not None and opts.crash_after <= 0:
        _crash(log, opts.exit_code)
    if opts.admin_socket:
        import threading
        threading.Thread(target=serve_admin, args=(opts, log), daemon=True).start()
    deadline = float("inf") if opts.crash_after is None else started_mono + opts.crash_after
    while (remaining := deadline - time.monotonic()) > 0:
        received = signal.sigtimedwait(STOP_SIGNALS, min(remaining, 3600.0))
        if received is None:
            continue
        if opts.ignore_sigterm:
            log("sigterm-ignored", signal=received.si_signo)
            continue
        log("stopped", signal=received.si_signo)
        _leave(0)
    _crash(log, opts.exit_code)


def _crash(log, exitcode):
    log("crashed", exitcode=exitcode)
    _leave(exitcode)


def _leave(exitcode):
    for path in _sockets:
        try:
            os.unlink(path)
        except OSError:
            pass
    os._exit(exitcode)  # at once, whatever the admin threads are doing (a "hang" reply, say)


def read_upgrade_state(path):
    """Missing file, bad JSON or missing keys all mean: nothing accepted, not ready, answer normally."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, TypeError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    return {"tag": str(data.get("tag") or ""), "height": int(data.get("height") or 0),
            "ready": bool(data.get("ready", False)), "reply": str(data.get("reply") or "ok"),
            "null_info": bool(data.get("null_info", False))}


class RpcError(Exception):
    """A request gorilla/rpc refuses: it answers HTTP 400 with this text (not a JSON-RPC reply)."""


_GO_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "bool"}


def decode_rpc_request(body):
    """Mirrors gorilla/rpc v1 (json codec): returns (method, id); raises RpcError for a 400."""
    text = body.decode("utf-8", "replace").lstrip()
    if not text:
        raise RpcError("EOF")
    try:
        req, _end = json.JSONDecoder().raw_decode(text)  # like Go's Decoder: one value, rest ignored
    except ValueError as err:
        raise RpcError(f"invalid character {text[err.pos:err.pos + 1]!r} looking for beginning of value")
    if req is None:
        req = {}
    if not isinstance(req, dict):
        raise RpcError(f"json: cannot unmarshal {_GO_KINDS[type(req)]} into Go value of type "
                       "json.serverRequest")
    fields = {key.lower(): value for key, value in req.items()}  # Go matches keys case-insensitively
    method = fields.get("method")
    method = "" if method is None else method  # null leaves Go's string empty
    if not isinstance(method, str):
        raise RpcError(f"json: cannot unmarshal {_GO_KINDS[type(method)]} into Go struct field "
                       "serverRequest.method of type string")
    parts = method.split(".")
    if len(parts) != 2:
        raise RpcError(f"rpc: service/method request ill-formed: {json.dumps(method)}")
    if parts[0] != "protocolupgrade":
        raise RpcError(f"rpc: can't find service {json.dumps(method)}")
    if parts[1] != "UpgradeStatus":
        raise RpcError(f"rpc: can't find method {json.dumps(method)}")
    params = fields.get("params")
    if params is None:
        raise RpcError("rpc: method request ill-formed: missing params field")
    if not isinstance(params, list):
        raise RpcError(f"json: cannot unmarshal {_GO_KINDS[type(params)]} into Go value of type "
                       "[1]interface {}")
    if params and params[0] is not None and not isinstance(params[0], dict):
        raise RpcError(f"json: cannot unmarshal {_GO_KINDS[type(params[0])]} into Go value of type "
                       "admin.ReadyForUpgradeArgs")
    return method, fields.get("id")


def serve_admin(opts, log):
    import http.server
    import socketserver

    class AdminHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Go's net/http
        timeout = 60

        def log_message(self, *_args):  # the default one fails on Unix sockets (no client address)
            pass

        def send_response(self, code, message=None):  # no Server header: Go sends none
            self.send_response_only(code, message)
            self.send_header("Date", self.date_time_string())

        def reply(self, status, body, content_type):
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def text(self, status, message):
            self.reply(status, message.encode(), "text/plain; charset=utf-8")

        def serve(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.split("?", 1)[0] != opts.admin_path:
                return self.text(404, "404 page not found\n")  # gorilla/mux: no route
            if self.command != "POST":
                return self.text(405, "rpc: POST method required, received " + self.command)
            content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0]
            if content_type.lower() != "application/json":
                return self.text(415, "rpc: unrecognized Content-Type: " + content_type)
            try:
                method, request_id = decode_rpc_request(body)
            except RpcError as err:
                return self.text(400, str(err))
            state = read_upgrade_state(opts.upgrade_file)
            log("rpc", method=method, id=request_id, reply=state["reply"])
            self.answer(state, request_id)

        def answer(self, state, request_id):
            mode = state["reply"]
            if mode == "hang":
                time.sleep(30)
            if mode == "close":
                self.close_connection = True  # no status line at all
                return
            if mode == "http500":
                return self.text(500, "internal server error\n")
            if mode == "garbage":
                return self.reply(200, b"not json{", "application/json; charset=utf-8")
            if mode not in ("ok", "hang", "error"):
                return self.text(500, f"fake vega: unknown reply mode {mode!r}\n")
            if request_id is None:  # gorilla/rpc treats it as a notification: 200, empty body
                return self.reply(200, b"", None)
            info = None if state["null_info"] else {"VegaReleaseTag": state["tag"],
                                                     "UpgradeBlockHeight": state["height"]}
            result = {"AcceptedReleaseInfo": info, "ReadyToUpgrade": state["ready"]}
            error = None
            if mode == "error":
                result, error = None, "something broke"
            body = _dumps({"result": result, "error": error, "id": request_id}) + "\n"
            self.reply(200, body.encode(), "application/json; charset=utf-8")

        do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = serve

    if opts.serve_after > 0:
        time.sleep(opts.serve_after)
    try:
        os.unlink(opts.admin_socket)  # a stale socket from an earlier run, as the real node does
    except FileNotFoundError:
        pass
    _sockets.append(opts.admin_socket)  # before bind: a stop right after it still removes the file
    class AdminServer(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # a client gone mid-request (a killed upgrade watcher) is the real node's log line, not a
            # traceback on the stderr it shares with Visor
            log("client_error", error=repr(sys.exc_info()[1]))

    server = AdminServer(opts.admin_socket, AdminHandler)
    log("serving", socket=opts.admin_socket, path=opts.admin_path)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
