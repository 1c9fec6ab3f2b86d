"""Soak: 50 real agents, the fleet service and a Mosquitto for SOAK_SECONDS, with pushes,
rollbacks and canary aborts along the way; then messages lost, duplicates and memory growth.

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--devices 50] [--processes 5] [--json]
    make soak [SOAK_SECONDS=600]

What runs, every part a real process started the way an operator starts it:
- a Mosquitto of the soak's own (free port, own config: ``helpers.Mosquitto``, as the tests);
- ``edgekit fleet serve`` (ingest, rollout controller, dashboard) on a SQLite registry (or
  ``--registry URL``), its workers with persistent sessions (``--session-expiry``);
- ``edgekit fleet simulate``: N agents over P processes, each device fed ``--predict-rate``
  predictions a second and closing a telemetry window every ``--telemetry-interval`` seconds;
- the operator's commands, one after the other with ``--pause`` seconds between them:
  first ``push`` 1.0.0 to everyone, then cycles of ``push`` 1.k.0 with canaries, ``fleet
  rollback`` to the version before, and ``push`` of a bundle whose health check fails (made by
  ``helpers.make_unhealthy``), which must abort at its canaries.

At the end the devices stop (each queues its last window), ingest drains, the service stops and
prints its totals, and the soak compares, for every device, the seqs its telemetry and event
outboxes handed out (``meta.json``'s counter; each outbox is seeded at 1 before the first
start, so the expected seqs are exactly 1..N) with the registry's rows: a seq neither in the
registry nor still queued on the device is lost. Duplicates: rows per (device, seq) in the
registry, and the QoS 1 redeliveries ingest saw and dropped (its ``duplicates`` total).
Memory: the RSS of every process (/proc), sampled every ``--sample-interval`` seconds; after a
warm-up, first vs last (median of three samples each) and a least-squares slope; "flat" when the
growth is within ``--rss-tolerance`` of the first value or ``--rss-floor-mib``, whichever is more.

Exit status 0 when nothing was lost, nothing stored twice, every operator command had the
expected outcome and every process's memory was flat; 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import digits_models  # noqa: E402
from helpers import Mosquitto, free_port, make_unhealthy  # noqa: E402

BIN = Path(sys.executable).parent
FLEET = "soak"
SERVE_GROUP = "soak-ingest"


# -- processes and their memory ---------------------------------------------------------------------


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (scanning /proc: no psutil needed)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Sampler:
    """RSS of named processes (and their children, found again at each sample) over time."""

    roots: dict[str, int]
    interval: float
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _names(self) -> dict[str, int]:
        names = {}
        for name, pid in self.roots.items():
            names[name] = pid
            workers = [c for c in _children(pid) if "resource_tracker" not in _cmdline(c)]
            for index, child in enumerate(sorted(workers)):
                names[f"{name}/worker-{index}"] = child
        return names

    def sample(self) -> None:
        now = time.monotonic()
        for name, pid in self._names().items():
            rss = _rss_kib(pid)
            if rss is not None:
                self.samples.setdefault(name, []).append((now, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def memory_report(
    samples: dict[str, list[tuple[float, int]]], after: float, tolerance: float, floor_mib: float
) -> list[dict[str, Any]]:
    rows = []
    for name, series in sorted(samples.items()):
        kept = [(t, kib) for t, kib in series if t >= after]
        if len(kept) < 6:
            rows.append({"process": name, "samples": len(kept), "flat": None})
            continue
        first = statistics.median(k for _, k in kept[:3]) / 1024
        last = statistics.median(k for _, k in kept[-3:]) / 1024
        times = [t for t, _ in kept]
        values = [k / 1024 for _, k in kept]
        mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
        var = sum((t - mean_t) ** 2 for t in times) or 1.0
        slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / var * 60
        allowed = max(first * tolerance, floor_mib)
        rows.append(
            {
                "process": name,
                "samples": len(kept),
                "first_mib": round(first, 1),
                "last_mib": round(last, 1),
                "peak_mib": round(max(values), 1),
                "growth_mib": round(last - first, 1),
                "growth_pct": round(100 * (last - first) / first, 1) if first else 0.0,
                "slope_mib_per_min": round(slope, 3),
                "allowed_mib": round(allowed, 1),
                "flat": last - first <= allowed,
            }
        )
    return rows


# -- the fleet's seqs ------------------------------------------------------------------------------


def seed_outboxes(sim: Path, devices: list[str]) -> None:
    """Start every device's telemetry and event counters at 1 (a fresh outbox starts at the
    clock in milliseconds), so the seqs a device hands out are exactly 1..next_seq-1."""
    for device in devices:
        for kind in ("telemetry", "events"):
            directory = sim / device / "outbox" / kind
            directory.mkdir(parents=True, exist_ok=True)
            meta = directory / "meta.json"
            if not meta.exists():
                meta.write_text(json.dumps({"next_seq": 1, "dropped_total": 0, "dropped_reported": 0}))


def device_outbox(sim: Path, device: str, kind: str) -> tuple[set[int], set[int], int]:
    """(seqs handed out, seqs still queued on the device, records dropped by the bound)."""
    directory = sim / device / "outbox" / kind
    meta = json.loads((directory / "meta.json").read_text())
    queued = {int(p.name[:-5]) for p in directory.glob("*.json") if p.name != "meta.json"}
    return set(range(1, int(meta["next_seq"]))), queued, int(meta.get("dropped_total", 0))


def registry_seqs(url: str) -> dict[str, dict[str, list[int]]]:
    from edgekit.fleet.registry import Registry
    from edgekit.fleet.registry.models import Event, Telemetry
    from sqlalchemy import select

    registry = Registry(url, migrate=False)
    try:
        out: dict[str, dict[str, list[int]]] = {"telemetry": {}, "events": {}}
        with registry.session() as session:
            for kind, model in (("telemetry", Telemetry), ("events", Event)):
                for device, seq in session.execute(select(model.device, model.seq)):
                    out[kind].setdefault(device, []).append(int(seq))
        return out
    finally:
        registry.close()


def accounting(sim: Path, devices: list[str], rows: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind in ("telemetry", "events"):
        produced = stored = queued_total = dropped = lost = duplicates = 0
        lost_examples: list[str] = []
        for device in devices:
            handed, queued, bound = device_outbox(sim, device, kind)
            seqs = rows[kind].get(device, [])
            in_registry = set(seqs)
            duplicates += len(seqs) - len(in_registry)
            missing = handed - in_registry - queued
            produced += len(handed)
            stored += len(in_registry & handed)
            queued_total += len(queued - in_registry)
            dropped += bound
            lost += len(missing)
            if missing and len(lost_examples) < 5:
                lost_examples.append(f"{device}: {sorted(missing)[:10]}")
            unknown = in_registry - handed
            if unknown:
                lost_examples.append(f"{device}: registry seqs never handed out {sorted(unknown)[:5]}")
        result[kind] = {
            "produced": produced,
            "in_registry": stored,
            "still_queued_on_devices": queued_total,
            "dropped_by_queue_bound": dropped,
            "lost": lost,
            "registry_duplicates": duplicates,
            "problems": lost_examples,
        }
    return result


# -- the operator ----------------------------------------------------------------------------------


@dataclass
class Operator:
    env: dict[str, str]
    broker: str
    log: list[dict[str, Any]] = field(default_factory=list)

    def run(self, what: str, args: list[str], expect_rc: int = 0, timeout: float = 600) -> bool:
        started = time.monotonic()
        result = subprocess.run(
            [str(BIN / "edgekit"), *args, "--broker", self.broker],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        ok = result.returncode == expect_rc
        entry = {
            "action": what,
            "seconds": round(time.monotonic() - started, 1),
            "exit": result.returncode,
            "ok": ok,
        }
        if not ok:
            entry["stderr"] = result.stderr.strip()[-500:]
        self.log.append(entry)
        print(f"[soak] {what}: exit {result.returncode} in {entry['seconds']} s", file=sys.stderr)
        return ok

    def push(self, model: Path, version: str, canary: int) -> bool:
        args = ["push", str(model), "--fleet", FLEET, "--name", "digits", "--version", version]
        args += ["--canary", str(canary), "--soak", "5", "--wait", "--timeout", "300", "--json"]
        return self.run(f"push {version} (canary {canary})", args)

    def rollback(self, version: str) -> bool:
        args = ["fleet", "rollback", "--fleet", FLEET, "--to", f"digits@{version}", "--wait"]
        return self.run(f"rollback to {version}", [*args, "--timeout", "300", "--json"])

    def push_unhealthy(self, bundle: Path, version: str) -> bool:
        # Exit 15: the rollout aborted (a canary failed its health check); the fleet stays put.
        args = ["push", str(bundle), "--fleet", FLEET, "--canary", "3", "--soak", "5", "--wait"]
        return self.run(f"canary abort {version}", [*args, "--timeout", "300"], expect_rc=15)


# -- the run ---------------------------------------------------------------------------------------


def wait_line(process: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"{what} exited before it was ready (exit {process.wait()})")
    doc: dict[str, Any] = json.loads(line)
    return doc


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    home = work / "home"
    home.mkdir()
    env = {**os.environ, "EDGEKIT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("EDGEKIT_KEY_PASSPHRASE", None)
    subprocess.run([str(BIN / "edgekit"), "keys", "init"], env=env, check=True, capture_output=True)
    with contextlib.redirect_stdout(sys.stderr):  # a first run exports the models (TensorFlow talks)
        models = digits_models()
    model = models / "digits_fp32.tflite"

    broker = Mosquitto(port=free_port(), directory=work / "mosquitto")
    broker.directory.mkdir()
    broker.start()
    registry = args.registry or f"sqlite:///{work / 'registry.db'}"
    env["EDGEKIT_REGISTRY"] = registry  # the operator's commands and fleet serve share one control plane
    sim = work / "sim"
    width = max(3, len(str(args.devices - 1)))
    devices = [f"{FLEET}-sim-{i:0{width}d}" for i in range(args.devices)]
    seed_outboxes(sim, devices)

    serve_cmd = [str(BIN / "edgekit"), "fleet", "serve", "--broker", broker.url, "--registry", registry]
    serve_cmd += ["--http-port", "0", "--workers", str(args.workers), "--group", SERVE_GROUP]
    serve_cmd += ["--session-expiry", "600", "--json"]
    serve_log = (work / "serve.log").open("wb")
    serve = subprocess.Popen(serve_cmd, env=env, stdout=subprocess.PIPE, stderr=serve_log, text=True)
    simulate = None
    sampler = None
    operator = Operator(env, broker.url)
    try:
        wait_line(serve, "fleet serve")
        sim_cmd = [str(BIN / "edgekit"), "fleet", "simulate", "--devices", str(args.devices)]
        sim_cmd += ["--fleet", FLEET, "--broker", broker.url, "--state-dir", str(sim)]
        sim_cmd += ["--processes", str(args.processes), "--predict-rate", str(args.predict_rate)]
        sim_cmd += ["--telemetry-interval", str(args.telemetry_interval), "--json"]
        sim_log = (work / "simulate.log").open("wb")
        simulate = subprocess.Popen(sim_cmd, env=env, stdout=subprocess.PIPE, stderr=sim_log, text=True)
        ready = wait_line(simulate, "fleet simulate")
        if ready["connected"] != args.devices:
            raise SystemExit(f"only {ready['connected']} of {args.devices} devices connected")
        assert broker.process is not None
        sampler = Sampler(
            {"mosquitto": broker.process.pid, "fleet serve": serve.pid, "fleet simulate": simulate.pid},
            args.sample_interval,
        )
        sampler.start()
        started = time.monotonic()
        deadline = started + args.seconds

        operator.push(model, "1.0.0", canary=0)
        warm_until = max(time.monotonic(), started + args.warmup)
        cycle = 0
        # Leave the last pause quiet; a cycle once begun is finished even past the deadline.
        while time.monotonic() + args.pause < deadline or cycle == 0:
            cycle += 1
            for step in ("push", "rollback", "abort"):
                time.sleep(args.pause)  # the fleet serves and reports in between: that is the soak
                if step == "push":
                    operator.push(model, f"1.{cycle}.0", canary=5)
                elif step == "rollback":
                    operator.rollback(f"1.{cycle - 1}.0")
                else:
                    from edgekit.fleet.control import ControlPlane
                    from edgekit.keys import load_signing_key
                    from edgekit.trust import TrustedKeys

                    os.environ["EDGEKIT_HOME"] = str(home)
                    key = load_signing_key(home)
                    good = work / f"good-{cycle}.ekb"
                    with ControlPlane.open(registry, TrustedKeys([key.public])) as control:
                        good.write_bytes(control.catalog.data("digits", f"1.{cycle}.0"))
                    bad = work / f"unhealthy-{cycle}.ekb"
                    make_unhealthy(good, key, bad, version=f"9.{cycle}.0")
                    operator.push_unhealthy(bad, f"9.{cycle}.0")
        time.sleep(max(0.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - started
        sampler.stop()

        # Stop the devices (each queues and tries to send its last window), let ingest drain.
        simulate.send_signal(signal.SIGINT)
        simulate.communicate(timeout=180)
        expected = 0
        for device in devices:
            handed, queued, _ = device_outbox(sim, device, "telemetry")
            expected += len(handed - queued)
        drain_deadline = time.monotonic() + 60
        while time.monotonic() < drain_deadline:
            rows = registry_seqs(registry)
            if sum(len(set(v)) for v in rows["telemetry"].values()) >= expected:
                break
            time.sleep(1)  # polling the database from outside the service: no event to wait on
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=120)
        totals = json.loads(out.strip().splitlines()[-1])
        rows = registry_seqs(registry)
        counts = accounting(sim, devices, rows)
    finally:
        if sampler is not None:
            sampler.stop()
        for process in (simulate, serve):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)
        broker.stop()
    memory = memory_report(sampler.samples, warm_until, args.rss_tolerance, args.rss_floor_mib)
    return {
        "command": " ".join(sys.argv),
        "seconds": round(elapsed, 1),
        "devices": args.devices,
        "processes": args.processes,
        "workers": args.workers,
        "registry": registry.split(":", 1)[0],
        "warmup_s": round(warm_until - started, 1),
        "load_average": os.getloadavg(),
        "actions": operator.log,
        "counts": counts,
        "ingest": {k: totals.get(k) for k in ("telemetry", "duplicates", "events", "states", "rejected")},
        "memory": memory,
        "rss_tolerance": {"fraction": args.rss_tolerance, "floor_mib": args.rss_floor_mib},
    }


def verdict(report: dict[str, Any]) -> list[str]:
    problems = []
    for kind, c in report["counts"].items():
        if c["lost"]:
            problems.append(f"{c['lost']} {kind} record(s) lost: {c['problems']}")
        if c["registry_duplicates"]:
            problems.append(f"{c['registry_duplicates']} {kind} record(s) stored twice")
    problems += [
        f"{a['action']} exited {a['exit']}: {a.get('stderr', '')}" for a in report["actions"] if not a["ok"]
    ]
    problems += [
        f"{m['process']} memory grew {m['growth_mib']} MiB" for m in report["memory"] if m["flat"] is False
    ]
    return problems


def print_table(report: dict[str, Any]) -> None:
    print(
        f"soak: {report['devices']} agents in {report['processes']} processes, fleet serve with "
        f"{report['workers']} worker(s) on {report['registry']}, Mosquitto; {report['seconds']} s "
        f"(warm-up {report['warmup_s']} s); load average {', '.join(f'{x:.1f}' for x in report['load_average'])}"
    )
    print("\n| action | seconds | exit | as expected |\n|---|---:|---:|---|")
    for a in report["actions"]:
        print(f"| {a['action']} | {a['seconds']} | {a['exit']} | {'yes' if a['ok'] else 'NO'} |")
    print(
        "\n| records | produced | in registry | still queued on devices | dropped (queue bound) | lost | stored twice |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, c in report["counts"].items():
        print(
            f"| {kind} | {c['produced']} | {c['in_registry']} | {c['still_queued_on_devices']} | "
            f"{c['dropped_by_queue_bound']} | **{c['lost']}** | {c['registry_duplicates']} |"
        )
    ingest = report["ingest"]
    print(
        f"\ningest totals: telemetry {ingest['telemetry']}, QoS 1 redeliveries/duplicates dropped "
        f"{ingest['duplicates']}, events {ingest['events']}, states {ingest['states']}, rejected {ingest['rejected']}"
    )
    tol = report["rss_tolerance"]
    print(
        f"\nmemory (RSS after warm-up; flat = growth <= max({tol['fraction']:.0%} of first, {tol['floor_mib']} MiB))"
    )
    print("\n| process | samples | first MiB | last MiB | peak MiB | growth MiB | slope MiB/min | flat |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for m in report["memory"]:
        if m["flat"] is None:
            print(f"| {m['process']} | {m['samples']} | | | | | | too few samples |")
            continue
        print(
            f"| {m['process']} | {m['samples']} | {m['first_mib']} | {m['last_mib']} | {m['peak_mib']} | "
            f"{m['growth_mib']:+} | {m['slope_mib_per_min']:+} | {'yes' if m['flat'] else 'NO'} |"
        )
    problems = verdict(report)
    print("\nverdict: " + ("PASS" if not problems else "FAIL\n- " + "\n- ".join(problems)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--processes", type=int, default=5, help="fleet simulate worker processes")
    parser.add_argument("--workers", type=int, default=1, help="fleet serve ingest workers")
    parser.add_argument("--registry", help="registry URL (default: SQLite in the soak's directory)")
    parser.add_argument("--predict-rate", type=float, default=2.0, help="predictions per device and second")
    parser.add_argument("--telemetry-interval", type=float, default=2.0, help="seconds per telemetry window")
    parser.add_argument("--pause", type=float, default=20.0, help="seconds between operator commands")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of memory samples ignored")
    parser.add_argument("--sample-interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed growth, fraction of first")
    parser.add_argument("--rss-floor-mib", type=float, default=4.0, help="allowed growth at least, MiB")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, registry)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekit-soak-"))
    try:
        report = soak(args, work)
    finally:
        if args.keep:
            print(f"[soak] kept {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    problems = verdict(report)
    report["pass"] = not problems
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
