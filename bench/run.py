#!/usr/bin/env python3
"""Visor against supervisord, circus and a direct Popen/waitpid loop: restart latency, launch -> first
exec, output pass-through, idle footprint; and Visor's upgrade detection and downtime, and how soon a
node is supervised again after a kill -9 of Visor (bench/adopt.py).

    bench/run [--quick] [--visor-root PATH] [--only restart,launch,output,idle,upgrade,adopt]

Sets up bench/.venv (supervisor, circus and Visor's own dependencies from PyPI) on first use and
re-runs itself inside it. Contenders run interleaved, round by round in rotating order, on this
machine; only Unix sockets are used. Prints every config used, then the tables and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv"
NEEDS = ["supervisor", "circus", "pyzmq", "msgpack", "psutil", "requests", "tomli-w", "inotify_simple", "tqdm"]
TESTS = ("launch", "restart", "output", "idle", "upgrade", "adopt")

# per run mode: rounds; warm-up run of each contender; launches per contender per round; restarts
# counted per run and its time limit (crash at once, crash at a random time); MiB written per output
# pass, passes per launch and the time they may take; idle window; upgrades and their status interval
PLANS = {
    "default": dict(rounds=3, warmup_s=3.0, launches=2, restarts=100, restart_limit_s=4.0, random_restarts=60,
                    random_limit_s=5.0, mib=512, passes=3, output_limit_s=17.0, idle_s=30.0, upgrades=10,
                    interval_ms=1000, adoptions=20),
    "quick": dict(rounds=1, warmup_s=1.0, launches=2, restarts=50, restart_limit_s=3.0, random_restarts=30,
                  random_limit_s=4.0, mib=512, passes=2, output_limit_s=10.0, idle_s=10.0, upgrades=4,
                  interval_ms=1000, adoptions=5),
}


def ensure_venv() -> None:
    """Creates bench/.venv with NEEDS when missing or stale, then re-executes this script inside it."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    stamp = VENV / "bench-deps.txt"
    if not stamp.exists() or stamp.read_text().split() != NEEDS:
        print(f"setting up {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        subprocess.check_call([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", *NEEDS])
        stamp.write_text("\n".join(NEEDS) + "\n")
    os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), str(Path(__file__).resolve()),
                                            *sys.argv[1:]])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer rounds and samples")
    parser.add_argument("--visor-root", default=str(BENCH.parent), help="the Visor checkout to measure")
    parser.add_argument("--only", default=",".join(TESTS), help=f"comma-separated subset of {','.join(TESTS)}")
    parser.add_argument("--contenders", default="direct,visor,supervisord,circus")
    parser.add_argument("--keep", action="store_true", help="keep the work folder under /tmp")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ensure_venv()
    opts = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # through the finally that cleans up
    checkout = Path(opts.visor_root).resolve()
    base = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))     # short: ipc paths stay < 100 bytes
    root = snapshot(checkout, base / "src")  # the code measured stays the same while others edit theirs
    sys.path.insert(0, str(root))            # visor and tests.* of the checkout being measured
    sys.path.insert(0, str(BENCH))
    import adopt
    import contenders as cs
    import measure
    import report
    import upgrade

    plan = PLANS["quick" if opts.quick else "default"]
    only = set(opts.only.split(","))
    py = sys.executable
    names = opts.contenders.split(",")
    pool = [cs.ALL[n](py, root) for n in names]
    info = {**report.machine(), "visor_root": str(checkout), "commit": _commit(checkout), "plan": plan,
            "mode": "quick" if opts.quick else "default", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"machine: {info['nproc']} cores, {info['cpu']}, kernel {info['kernel']}, Python {info['python']}, "
          f"load {info['load_1m_at_start']}\nvisor: {checkout} @ {info['commit']}, copied to {root}\nplan: {plan}", flush=True)
    samples: dict[str, dict[str, list[float]]] = {}
    configs: dict[str, str] = {}
    up: dict = {}
    t_start = time.monotonic()

    def add(metric, name, value):
        if value is not None:
            samples.setdefault(metric, {}).setdefault(name, []).append(value)

    def keep_config(test, c):
        configs.setdefault(f"{c.name} ({test})", c.config.replace(str(base), "$WORK").replace(py, "$PY"))

    try:
        print(f"warm-up: each contender runs {plan['warmup_s']:g} s, uncounted (bytecode and page caches)",
              flush=True)
        for c in pool:
            measure.launch(c, base / f"warmup-{c.name}", py, linger_s=plan["warmup_s"])
        for r in range(plan["rounds"]):
            order = pool[r % len(pool):] + pool[:r % len(pool)]
            print(f"round {r + 1}/{plan['rounds']}: order {[c.name for c in order]}", flush=True)
            for c in order if "launch" in only else ():
                for k in range(plan["launches"]):
                    ms = measure.launch(c, base / f"launch-{c.name}-{r}-{k}", py)
                    keep_config("launch", c)
                    add("first_exec_ms", c.name, ms)
                    print(f"  launch  {c.name:12} first exec after {ms:.1f} ms" if ms else
                          f"  launch  {c.name:12} no exec within 20 s", flush=True)
            for c in order if "restart" in only else ():
                for metric, life_ms, count, limit_s in (
                        ("restart_ms", 0, plan["restarts"], plan["restart_limit_s"]),
                        ("restart_random_ms", c.crash_life_ms, plan["random_restarts"], plan["random_limit_s"])):
                    gaps = measure.restart(c, base / f"{metric}-{c.name}-{r}", py, count, limit_s, life_ms)
                    keep_config(f"restart, child lives 0..{life_ms} ms", c)
                    for g in gaps:
                        add(metric, c.name, g)
                    print(f"  restart {c.name:12} life 0..{life_ms:<4} ms {len(gaps):4} restarts, median "
                          f"{report.median(gaps):.1f} ms", flush=True)
            for c in order if "output" in only else ():
                rates, stdout_is = measure.output(c, base / f"output-{c.name}-{r}", py, plan["mib"], plan["passes"],
                                                  plan["output_limit_s"])
                keep_config("output", c)
                for mbps in rates:
                    add("output_mbps", c.name, mbps)
                info.setdefault("child_stdout", {})[c.name] = stdout_is
                print(f"  output  {c.name:12} {' '.join(f'{x:.0f}' for x in rates)} MB/s; child's stdout: "
                      f"{stdout_is}", flush=True)
        if "idle" in only:
            print(f"idle: all contenders at once, {plan['idle_s']:g} s window", flush=True)
            idle = measure.idle(pool, base / "idle", py, plan["idle_s"])
            for c in pool:
                keep_config("idle", c)
            for name, res in idle.items():
                add("idle_uss_mib", name, res["uss"])
                add("idle_pss_mib", name, res["pss"])
                add("idle_cpu_ms_30s", name, res["cpu_ms_30s"])
                add("idle_cpu_ticks_30s", name, res["cpu_ms_30s_ticks"])
            info["idle"] = idle
        if "upgrade" in only and "visor" in names:
            print(f"upgrade: {plan['upgrades']} upgrades, status interval {plan['interval_ms']} ms", flush=True)
            up = upgrade.run(base / "upgrade", py, root, plan["upgrades"], plan["interval_ms"])
            configs["visor (upgrade)"] = up.pop("config").replace(str(base), "$WORK").replace(py, "$PY")
        if "adopt" in only and "visor" in names:
            print(f"adopt: {plan['adoptions']} kill -9 of `visor run`, each followed by a new one", flush=True)
            (base / "adopt").mkdir()
            info["adopt"] = adopt.run(base / "adopt", py, root, plan["adoptions"])
    finally:                                 # even on ^C, SIGTERM or a closed stdout: nothing stays behind
        for c in pool:
            try:
                c.stop()
            except BaseException:            # noqa: B036 - the next contender must be stopped too
                pass
        left = cs.kill_leftovers(base)
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
        if left:
            print(f"killed {len(left)} leftover processes", flush=True)

    print("\n== configs ($WORK: the run's work folder, $PY: the bench interpreter) ==")
    for key, text in configs.items():
        print(f"--- {key}\n{text.rstrip()}")
    rows = report.targets(samples, up, plan["interval_ms"])
    text = "\n\n".join([report.table(samples, info.get("child_stdout", {})), report.upgrade_table(up) if up else "",
                        adopt.summary(info["adopt"]) if "adopt" in info else "",
                        report.footprint_text(info.get("idle", {})), report.targets_text(rows)])
    print(f"\n== results ({info['mode']} run, {time.monotonic() - t_start:.0f} s) ==\n{text}")
    _save(info, samples, up, configs, text)
    return 0


def snapshot(checkout: Path, dest: Path) -> Path:
    """Copies what runs (bin, visor, workers, and tests for the fakes and helpers) out of the checkout."""
    for part in ("bin", "visor", "workers", "tests"):
        shutil.copytree(checkout / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _commit(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "visor", "workers"],
                           capture_output=True, text=True).stdout.strip()
    return (done.stdout.strip()[:12] or "unknown") + (" with uncommitted changes" if dirty else "")


def _save(info, samples, up, configs, text) -> None:
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = {"info": info, "samples": samples, "upgrade": up, "configs": configs, "text": text}
    (out / f"{stamp}.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "latest.txt").write_text(text + "\n")
    print(f"\nsaved bench/results/{stamp}.json and bench/results/latest.txt")


if __name__ == "__main__":
    sys.exit(main())
