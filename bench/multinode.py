"""Sessions spread over more nodes: does what a session and a window cost stay flat?

Issue #25, item 5. For each N of `--nodes`, a local Ray cluster of N nodes
on this machine (bench/local_cluster.py: a head with the GCS, the Serve
controller, HAProxy, the ingress and the embedding replica, plus N-1 `ray
start` nodes, every node taking SessionActors), the app deployed with the
BENCHMARK-ONLY no-op embedder (`DIGLETT_EMBEDDER=noop`), and the same
`--sessions` real-time sessions through it (bench/load.py's: each enrolls
two dev-set speakers and talks for `--step-s`). Every "node" runs on the
same cores, so capacity cannot grow with N here; what can be compared is
the cost: serving CPU per window and per session, split by node and by
process role (bench/procs.py), with each node's idle cost (its raylet,
agents and batcher, once the sessions have ended) reported apart.

    flock /tmp/diglett-ray.lock python -m bench.multinode
    flock /tmp/diglett-ray.lock python -m bench.multinode --nodes 1,2,3,3,2,1
    flock /tmp/diglett-ray.lock python -m bench.multinode --append  # more runs
    python -m bench.multinode --report-only   # the docs table from the JSON

Writes bench/results/multinode.json and the table between the `multinode`
markers of docs/capacity.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

from actors.fork_server import with_forked_workers
from actors.session_actor import actor_name
from bench import harness as hn
from bench import load, procs
from bench.doc_blocks import write_block
from bench.harness import RESULTS, ROOT, SPEAKERS, Server
from bench.load import CpuSnapshot
from bench.local_cluster import Node, cluster_env, local_cluster
from serve_app.serve_env import apply_serve_env, wait_until_healthy

HEAD = "head"
HEAD_RESOURCES = {"diglett_session": 100, "diglett_ingress": 1, "diglett_embed": 1}
NODE_RESOURCES = {"diglett_session": 100}


def specs(n: int) -> dict[str, tuple[int, dict]]:
    """`local_cluster` specs of N session nodes: the head and N-1 more."""
    out = {HEAD: (1, HEAD_RESOURCES)}
    out.update({f"node{i}": (1, NODE_RESOURCES) for i in range(2, n + 1)})
    return out


def node_pids(nodes: Mapping[str, Node]) -> dict[int, str]:
    """{pid: node name} of each node's processes: its `ray start` and all it
    started (raylet, agents, workers; the GCS and dashboard on the head)."""
    out: dict[int, str] = {}
    for name, node in nodes.items():
        try:
            root = psutil.Process(node.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        out.update({p.pid: name for p in with_forked_workers(tree)})
    return out


def cpu_by_node(nodes: Mapping[str, Node]) -> CpuSnapshot:
    """A `procs.cpu_by_pid` whose roles are "node/role"."""

    def snapshot() -> dict[int, tuple[str, float]]:
        where = node_pids(nodes)
        return {
            pid: (f"{where.get(pid, '?')}/{role}", cpu)
            for pid, (role, cpu) in procs.cpu_by_pid().items()
        }

    return snapshot


def split(by_key: Mapping[str, float]) -> tuple[dict, dict]:
    """({node: sum}, {role: sum}) of {"node/role": value}: nodes head first,
    roles largest first."""
    nodes: dict[str, float] = {}
    roles: dict[str, float] = {}
    for key, value in by_key.items():
        node, _, role = key.partition("/")
        nodes[node] = nodes.get(node, 0.0) + value
        roles[role] = roles.get(role, 0.0) + value
    return (
        {k: round(nodes[k], 3) for k in sorted(nodes, key=lambda k: (k != HEAD, k))},
        {k: round(v, 3) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])},
    )


def sessions_per_node(
    dash: str, nodes: Mapping[str, Node], session_ids: list[str]
) -> dict[str, int]:
    """How many of these sessions' SessionActors run on each node."""
    from ray.util.state import list_actors

    pids = {
        a.name: a.pid
        for a in list_actors(
            address=dash, filters=[("state", "=", "ALIVE")], limit=10000, detail=True
        )
        if a.name
    }
    where = node_pids(nodes)
    counts = {name: 0 for name in nodes}
    for sid in session_ids:
        node = where.get(pids.get(actor_name(sid), -1), "?")
        counts[node] = counts.get(node, 0) + 1
    return counts


async def placement(
    dash: str, nodes: Mapping[str, Node], results: list[load.SessionResult]
) -> dict[str, int]:
    """`sessions_per_node` once every session has opened (or failed)."""
    while not all(r.session_id or r.error for r in results):
        await asyncio.sleep(0.5)
    sids = [r.session_id for r in results if r.session_id]
    return await asyncio.to_thread(sessions_per_node, dash, nodes, sids)


def idle_cpu(snapshot: CpuSnapshot, seconds: float) -> dict[str, float]:
    """{"node/role": % of a core} over `seconds` with no session open."""
    before, t0 = snapshot(), time.monotonic()
    time.sleep(seconds)
    after, dt = snapshot(), time.monotonic() - t0
    return {k: v * 100 / dt for k, v in procs.cpu_by_role(before, after).items()}


def memory_by_node(nodes: Mapping[str, Node]) -> dict[str, dict]:
    """{node: {role: {rss_mib, uss_mib, count}, "total": ...}}."""
    members: dict[str, list[psutil.Process]] = {name: [] for name in nodes}
    for pid, name in node_pids(nodes).items():
        try:
            members[name].append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return {name: procs.memory_by_role(ps) for name, ps in members.items()}


def ours_s() -> float:
    """CPU seconds of the cluster's processes and of this one (the clients)."""
    own = sum(psutil.Process().cpu_times()[:2])
    return own + sum(cpu for _, cpu in procs.cpu_by_pid().values())


async def _measure(
    args, srv: Server, dash: str, nodes: Mapping[str, Node], enrolls, conv
) -> tuple[dict, dict[str, int]]:
    """bench/load.py's step of `--sessions` sessions, and where they ran."""
    results = [load.SessionResult() for _ in range(args.sessions)]
    row, placed = await asyncio.gather(
        load.step(
            args,
            srv,
            enrolls,
            conv,
            args.sessions,
            cpu_snapshot=cpu_by_node(nodes),
            results=results,
        ),
        placement(dash, nodes, results),
    )
    return row, placed


def run_cluster(args, n: int, enrolls, conv) -> dict:
    """One cluster of `n` session nodes: the sessions, then its idle cost."""
    env = cluster_env(DIGLETT_EMBEDDER="noop")
    with local_cluster(specs(n), env, prefix="dgbn-") as c:
        nodes = c["nodes"]
        if not wait_until_healthy(c["http"], timeout_s=60):
            print("multinode: the direct route is not up; sessions may be slower")
        pool_s = procs.wait_for_pool()
        busy0, ours0, t0 = procs.machine_busy_s(), ours_s(), time.monotonic()
        row, placed = asyncio.run(
            _measure(args, Server(c["ws"]), c["dash"], nodes, enrolls, conv)
        )
        # What other jobs on this machine took meanwhile, in % of a core.
        others = (procs.machine_busy_s() - busy0) - (ours_s() - ours0)
        others_pct = others * 100 / (time.monotonic() - t0)
        time.sleep(args.settle_s)  # the sessions' actors back in the pool
        idle = idle_cpu(cpu_by_node(nodes), args.idle_s)
        memory = memory_by_node(nodes)
    return {
        "nodes": n,
        "pool_filled_s": round(pool_s, 1),
        "other_jobs_percent_of_core": round(others_pct, 1),
        "sessions_per_node": placed,
        "step": row,
        "idle_percent_of_core": {k: round(v, 3) for k, v in sorted(idle.items())},
        "idle_memory_mib": {
            node: {
                role: {k: round(v, 1) for k, v in r.items()} for role, r in m.items()
            }
            for node, m in memory.items()
        },
    }


def summary(run: dict) -> dict:
    """The figures of the docs table for one run."""
    step, steady = run["step"], run["step"]["steady"]
    sessions = step["sessions"]
    per_window = steady["cpu_ms_per_window_by_role"]
    by_node, by_role = split(per_window)
    idle_node, idle_role = split(run["idle_percent_of_core"])
    # A node's fixed cost: all its processes but the pooled SessionActors.
    fixed = split(
        {k: v for k, v in run["idle_percent_of_core"].items() if "/sessions" not in k}
    )[0]
    ms_per_s = steady["server_cpu_ms_per_window"] * steady["windows_per_s"]
    fixed_ms_per_s = sum(fixed.values()) * 10  # % of a core -> ms/s
    return {
        "nodes": run["nodes"],
        "sessions_per_node": run["sessions_per_node"],
        "other_jobs_percent_of_core": run.get("other_jobs_percent_of_core"),
        "windows_per_s": steady["windows_per_s"],
        # A label for every hop sent (the final, shorter one too), each
        # received, and no session failed.
        "all_delivered": not step["errors"]
        and step["labels"] == step["summary_labels"] == step["hops_sent"],
        "labels": step["labels"],
        "summary_labels": step["summary_labels"],
        "hops_sent": step["hops_sent"],
        "errors": step["errors"],
        "lag_p95_ms": step["lag_p95"],
        "cpu_ms_per_window": steady["server_cpu_ms_per_window"],
        "cpu_ms_per_window_by_node": by_node,
        "cpu_ms_per_window_by_role": by_role,
        "session_percent_of_core": round(ms_per_s / 10 / sessions, 2),
        # Less what the nodes cost idle (their pooled SessionActors aside).
        "cpu_ms_per_window_above_idle": round(
            (ms_per_s - fixed_ms_per_s) / steady["windows_per_s"], 3
        ),
        "idle_percent_of_core_by_node": idle_node,
        "idle_percent_of_core_by_role": idle_role,
        "node_fixed_percent_of_core": fixed,
        # Private memory, the pooled SessionActors' aside.
        "node_fixed_uss_mib": {
            node: m["total"]["uss_mib"] - m.get("sessions", {}).get("uss_mib", 0.0)
            for node, m in run["idle_memory_mib"].items()
        },
    }


def span(values: list[float], fmt: str = "{:.1f}") -> str:
    """The range of `values`: "a", or "a–b"."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def median_span(values: list[float], fmt: str = "{:.1f}") -> str:
    """The median of `values` and, with more than one, their range."""
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} ({span(values, fmt)})"


def mean_of(dicts: list[Mapping[str, float]]) -> dict[str, float]:
    """Key by key, the mean of `dicts` (a key missing from one counts 0)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: sum(d.get(k, 0.0) for d in dicts) / len(dicts) for k in keys}


def joined(d: Mapping[str, float], fmt: str = "{:.1f}") -> str:
    return ", ".join(f"{k} {fmt.format(v)}" for k, v in d.items())


def others_span(runs: list[dict]) -> str:
    """The range of other jobs' CPU over these runs ("–" where unmeasured)."""
    loads = [s["other_jobs_percent_of_core"] for s in runs]
    return "–" if None in loads else span(loads, "{:.0f}")


def table_row(runs: list[dict]) -> str:
    """The main table's row of the runs with the same N."""
    placed = sorted(
        {" + ".join(str(v) for v in s["sessions_per_node"].values()) for s in runs}
    )
    delivered = "yes" if all(s["all_delivered"] for s in runs) else "no"
    labels = sum(s["labels"] for s in runs)

    def col(key: str, fmt: str = "{:.1f}") -> str:
        return span([s[key] for s in runs], fmt)

    def mid(key: str) -> str:
        return median_span([s[key] for s in runs])

    return (
        f"| {runs[0]['nodes']} | {len(runs)} | {'; '.join(placed)}"
        f" | {col('windows_per_s')} | {delivered} ({labels:,} labels)"
        f" | {col('lag_p95_ms', '{:.0f}')} ms | {mid('cpu_ms_per_window')} ms"
        f" | {mid('cpu_ms_per_window_above_idle')} ms"
        f" | {joined(mean_of([s['cpu_ms_per_window_by_node'] for s in runs]))}"
        f" | {mid('session_percent_of_core')} | {others_span(runs)} |"
    )


def idle_row(runs: list[dict]) -> str:
    """The idle table's row of the runs with the same N."""
    cpu = mean_of([s["node_fixed_percent_of_core"] for s in runs])
    uss = mean_of([s["node_fixed_uss_mib"] for s in runs])
    return f"| {runs[0]['nodes']} | {joined(cpu)} | {joined(uss, '{:.0f}')} |"


def role_row(runs: list[dict], roles: list[str]) -> str:
    """The by-role table's row of the runs with the same N."""
    role_ms = mean_of([s["cpu_ms_per_window_by_role"] for s in runs])
    cells = " | ".join(f"{role_ms.get(r, 0.0):.1f}" for r in roles)
    return f"| {runs[0]['nodes']} | {cells} |"


def table(result: dict) -> str:
    """The docs' Markdown: a row per N, the range of its runs (their mean
    where a column splits by node or role)."""
    by_n: dict[int, list[dict]] = {}
    for run in result["runs"]:
        by_n.setdefault(run["nodes"], []).append(summary(run))
    groups = [by_n[n] for n in sorted(by_n)]
    roles = list(mean_of([s["cpu_ms_per_window_by_role"] for g in groups for s in g]))
    return (
        "\n".join(
            [
                f"{result['sessions']} real-time sessions talking for "
                f"{result['step_s']:g} s, no-op model, every node on the same "
                f"{result['cpus']}-core machine ({result['date']}). Serving CPU "
                "is every Ray process's, HAProxy's included, while all sessions "
                "stream. The machine is shared: the last column is other jobs' "
                "CPU during the runs. Over the runs: ranges, the median before "
                "the range where there is one; by node and by role, their mean.",
                "",
                "| session nodes | runs | sessions per node (head first) "
                "| windows/s | every label delivered | label lag p95 "
                "| serving CPU per window | less the nodes' idle cost | by node "
                "| per session (% of a core) | other jobs (% of a core) |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
                *[table_row(g) for g in groups],
                "",
                "Each node's idle cost, after the sessions (its pooled "
                "SessionActors left out): CPU in % of a core, private memory "
                "(USS) in MiB.",
                "",
                "| session nodes | CPU by node | memory by node |",
                "|---|---|---|",
                *[idle_row(g) for g in groups],
                "",
                "Serving CPU per window by process role, ms, all nodes together:",
                "",
                "| session nodes | " + " | ".join(roles) + " |",
                "|---|" + "---|" * len(roles),
                *[role_row(g, roles) for g in groups],
            ]
        )
        + "\n"
    )


def new_result(args) -> dict:
    """The results so far: --out's with --append (same sessions and talk),
    else none."""
    result = {
        "date": datetime.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "sessions": args.sessions,
        "step_s": args.step_s,
        "runs": [],
    }
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        same = ("cpus", "sessions", "step_s")
        if any(old[k] != result[k] for k in same):
            raise SystemExit(f"--append: {args.out} has other {same}")
        result["runs"] = old["runs"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,3", help="session nodes of each run")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--step-s", type=float, default=40.0, help="seconds of talk")
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle measured")
    ap.add_argument("--settle-s", type=float, default=5.0, help="before idle")
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    ap.add_argument("--out", type=Path, default=RESULTS / "multinode.json")
    ap.add_argument(
        "--table",
        default=str(ROOT / "docs" / "capacity.md"),
        help="a file whose multinode block gets the table ('' = none)",
    )
    ap.add_argument("--report-only", action="store_true", help="table from --out")
    ap.add_argument(
        "--append", action="store_true", help="add the runs to those in --out"
    )
    # bench/load.py's step: real time, no burst.
    ap.set_defaults(fast=False, speed=1.0, burst=0)
    args = ap.parse_args(argv)
    if args.report_only:
        result = json.loads(args.out.read_text())
    else:
        # As on the nodes: wait_until_healthy then waits for HAProxy's route.
        apply_serve_env()
        enrolls, conv = hn.voices(args.data)
        result = new_result(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for n in [int(x) for x in args.nodes.split(",")]:
            run = run_cluster(args, n, enrolls, conv)
            result["runs"].append(run)
            print(json.dumps(summary(run)), flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")  # so far
    text = table(result)
    if args.table:
        write_block(Path(args.table), "multinode", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
