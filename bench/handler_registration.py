"""Generic ÷ registered method handlers: the echo RPC and GetAdAccount, each served both ways.

    python bench/handler_registration.py                 # 3 rounds of 10 s per variant, 100,000 rows
    python bench/handler_registration.py --smoke         # 2 rounds of 2 s, 5,000 rows: does it run?
    python bench/handler_registration.py --seconds 20 --rounds 5

Why: grpcio 1.85's generic-handler path (`server.add_generic_rpc_handlers`) costs an asyncio.Task
and two event-loop hops per RPC more than the registered one (`server.add_registered_method_handlers`,
grpc/grpc#41796). The issue asked to register AdAccountService the registered way and keep
whichever is faster; measured here, GetAdAccount served 2-4 % more with generic handlers in every
round of two runs, the echo no difference, so the server ships generic handlers
(app.register_service). This measures it again.

Two pairs of servers, one pair at a time, both servers of a pair up at once (one process each):

- echo: bench/echo_server.py --handlers generic (its default), and --handlers registered: the
  gRPC path alone, no database, answering a prebuilt AdAccount of a point read's size;
- GetAdAccount: `adaccounts serve --workers 1` on a seeded throwaway PostgreSQL, through
  bench/serve_with_handlers.py, which replaces app.register_service with one that registers the
  same handlers generic or registered, nothing in server/ changed. The launcher refuses to start
  a server unless the service was registered the way it claims, and this script also checks its
  line in each server's log.

h2load (bench/h2load.py) keeps 64 calls in flight over 32 HTTP/2 connections, as bench/run.py
does, with a warm-up before each measured window (2 s; 0.5 s with --smoke). The rounds alternate
generic, registered, generic, registered, ... so that the machine's drift falls on both; the table
gives each variant's medians over its rounds and registered ÷ generic, with the lowest and highest
ops/s ratio of one round's pair in brackets (the noise). Everything it starts (servers, PostgreSQL,
its temporary directory) is stopped and deleted on the way out: the end, an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
from h2load import H2load
from h2load import installed as h2load_installed
from harness import bench_workdir, exit_with
from run import ROOT, Bench, Figures, Profile, Server, _echo_answers, _grpc_serving, free_port
from serve_with_handlers import marker

IN_FLIGHT = 64
CONNECTIONS = 32
VARIANTS = ("generic", "registered")  # A, B: the rounds alternate in this order; ratios are B ÷ A


@dataclass
class Pair:
    """One RPC measured both ways: each variant's rounds, in the order they ran."""

    name: str
    runs: dict[str, list[Figures]]

    def median(self, variant: str, metric: str) -> float:
        values = [v for v in (getattr(f, metric) for f in self.runs[variant]) if v == v]  # nan: no call answered
        return statistics.median(values) if values else float("nan")

    def ratio(self, metric: str) -> float:
        generic, registered = self.median("generic", metric), self.median("registered", metric)
        return registered / generic if generic else float("nan")

    def round_ratios(self) -> list[float]:
        return [b.ops / a.ops for a, b in zip(self.runs["generic"], self.runs["registered"], strict=True) if a.ops]

    def errors(self, variant: str) -> int:
        return sum(f.errors for f in self.runs[variant])


def measure_pair(
    bench: Bench,
    name: str,
    case: str,
    command: Callable[[str, int], list[str]],
    ready: Callable[[str], bool],
    check: Callable[[Server, str], None],
    env: dict[str, str],
    rounds: int,
) -> Pair:
    """Both variants' servers up at once; `rounds` measurements of each, alternating."""
    runs: dict[str, list[Figures]] = {variant: [] for variant in VARIANTS}
    with contextlib.ExitStack() as servers:
        ports = {}
        for variant in VARIANTS:
            port = free_port()  # taken after the previous server has bound its own
            server = servers.enter_context(
                bench.server(f"{name}, {variant} handlers", command(variant, port), ready, port, 1, env)
            )
            check(server, variant)
            ports[variant] = port
        for round_ in range(1, rounds + 1):
            for variant in VARIANTS:
                runs[variant].append(bench.measure(f"{name}, {variant}, round {round_}", case, ports[variant]))
    return Pair(name, runs)


def check_launcher(server: Server, variant: str) -> None:
    """The launcher said it registered AdAccountService as `variant` (it refuses to start otherwise)."""
    log = server.log.read_text(errors="replace")
    if marker(variant) not in log:
        raise RuntimeError(f"{server.name}: no {marker(variant)!r} in its log, so not measured:\n{server.tail()}")


def render(pairs: list[Pair], header: list[str]) -> str:
    lines = [
        *header,
        "",
        "| RPC | handlers | ops/s | p50 ms | p99 ms | errors | ops/s per round |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for pair in pairs:
        for variant in VARIANTS:
            runs = pair.runs[variant]
            cells = [
                pair.name,
                variant,
                f"{pair.median(variant, 'ops'):,.0f}",
                f"{pair.median(variant, 'p50_ms'):.2f}",
                f"{pair.median(variant, 'p99_ms'):.2f}",
                str(pair.errors(variant)),
                " / ".join(f"{f.ops:,.0f}" for f in runs),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        rounds = sorted(pair.round_ratios())
        spread = f" ({rounds[0]:.3f}..{rounds[-1]:.3f})" if rounds else ""
        cells = [
            pair.name,
            "**registered ÷ generic**",
            f"**{pair.ratio('ops'):.3f}**{spread}",
            f"{pair.ratio('p50_ms'):.3f}",
            f"{pair.ratio('p99_ms'):.3f}",
            "",
            "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for pair in pairs:
        for variant in VARIANTS:
            first = next((f.first_error for f in pair.runs[variant] if f.errors), "")
            if first:
                lines.append(f"first error in {pair.name}, {variant}: {first}")
    return "\n".join(lines)


# A median ops/s ratio closer to 1 than this is no difference, however the rounds fall.
MARGIN = 0.03


def faster(pair: Pair) -> str | None:
    """The variant faster in every round (two at least) and by MARGIN in the medians, or None."""
    ratios, ratio = pair.round_ratios(), pair.ratio("ops")
    if len(ratios) < 2:
        return None
    if all(r > 1 for r in ratios) and ratio >= 1 + MARGIN:
        return "registered"
    if all(r < 1 for r in ratios) and ratio <= 1 - MARGIN:
        return "generic"
    return None


def conclusion(pairs: list[Pair], smoke: bool) -> str:
    """One line: how registered compares with generic on each RPC, and which to keep.

    GetAdAccount, the real service, decides when one variant is faster there in every round
    and by MARGIN; otherwise the echo RPC, the handler path alone, does on the same terms;
    otherwise there is no measurable difference and the server stays as shipped (generic).
    """
    by_name = {pair.name: pair for pair in pairs}
    echo, get = by_name["echo"], by_name["GetAdAccount"]

    def describe(pair: Pair) -> str:
        ratios = pair.round_ratios()
        wins = sum(r > 1 for r in ratios)
        return f"{pair.ratio('ops'):.3f} on {pair.name} (registered faster in {wins}/{len(ratios)} rounds)"

    keep = {
        "registered": "switch app.register_service to add_registered_method_handlers",
        "generic": "keep add_generic_rpc_handlers (as shipped)",
    }
    if (side := faster(get)) is not None:
        verdict = f"{side} handlers are faster on GetAdAccount in every round: {keep[side]}"
    elif (side := faster(echo)) is not None:
        verdict = (
            f"GetAdAccount differs by no more than this machine's noise, and the echo RPC (the handler path "
            f"alone) is faster with {side} handlers: {keep[side]}"
        )
    else:
        verdict = f"no difference beyond this machine's noise on either RPC: {keep['registered']}"
    errors = sum(pair.errors(variant) for pair in pairs for variant in VARIANTS)
    caveats = []
    if errors:
        caveats.append(f"{errors} errors, see above")
    if smoke:
        caveats.append("a --smoke run, too short to decide anything")
    caveat = f" ({'; '.join(caveats)})" if caveats else ""
    parts = "; ".join(describe(pair) for pair in pairs)
    return f"Conclusion{caveat}: registered ÷ generic ops/s = {parts}. {verdict[0].upper()}{verdict[1:]}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, help="measured seconds per round and variant (default 10; 2 --smoke)")
    parser.add_argument("--rounds", type=int, help="rounds, each variant once per round (default 3; 2 --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: 2 rounds of 2 s, 5,000 rows")
    args = parser.parse_args(argv)
    if not h2load_installed():
        parser.error("h2load is not installed (Debian: apt-get install nghttp2-client)")
    seconds = args.seconds if args.seconds is not None else (2.0 if args.smoke else 10.0)
    rounds = args.rounds if args.rounds is not None else (2 if args.smoke else 3)
    if seconds < 0.5 or rounds < 1:
        parser.error("--seconds must be at least 0.5 and --rounds at least 1")
    profile = Profile(
        "smoke" if args.smoke else "full",
        rows=5_000 if args.smoke else 100_000,
        warmup_s=0.5 if args.smoke else 2.0,
        duration_s=seconds,
    )

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with bench_workdir("adaccounts-handlers-") as (workdir, cleanup):
        # run.py's Bench: the throwaway PostgreSQL, its seeding, the servers' environment, h2load.
        bench = Bench(SimpleNamespace(threads=None, set=[]), profile, workdir, cleanup)
        bench.start_database()
        bench.h2load = H2load(workdir, profile, bench.ids[0], IN_FLIGHT, CONNECTIONS)
        env = bench.env_for(bench.tree, {"GRPC_WORKERS": "1"})
        bench_dir = ROOT / "bench"

        def echo_command(variant: str, port: int) -> list[str]:
            script = str(bench_dir / "echo_server.py")
            return [sys.executable, script, "--port", str(port), "--workers", "1", "--handlers", variant]

        def serve_command(variant: str, port: int) -> list[str]:
            script = str(bench_dir / "serve_with_handlers.py")
            serve = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            return [sys.executable, script, "--handlers", variant, *serve]

        pairs = [
            measure_pair(bench, "echo", "echo", echo_command, _echo_answers, lambda *_: None, env, rounds),
            measure_pair(bench, "GetAdAccount", "get", serve_command, _grpc_serving, check_launcher, env, rounds),
        ]
    load_after = os.getloadavg()[0]
    order = ", ".join(["generic, registered"] * rounds)
    header = [
        f"Generic ÷ registered method handlers, {profile.name}: grpcio {grpc.__version__}, {bench.tree.label}",
        f"echo: bench/echo_server.py --workers 1 --handlers generic|registered; GetAdAccount: adaccounts serve "
        f"--workers 1 via bench/serve_with_handlers.py, {profile.rows:,} rows in a throwaway PostgreSQL",
        f"h2load: {IN_FLIGHT} calls in flight over {CONNECTIONS} connections; {seconds:g} s per round after "
        f"{profile.warmup_s:g} s warm-up; {rounds} round(s) per variant, alternating ({order}); medians below",
        f"{os.cpu_count()} CPUs; 1-min load average {load_before:.2f} at the start, {load_after:.2f} at the end; "
        f"took {time.monotonic() - started:.0f} s",
    ]
    print(render(pairs, header), flush=True)
    print("", flush=True)
    print(
        "ops/s: registered ÷ generic > 1 is registered faster; p50/p99: < 1 is registered answering sooner.",
        flush=True,
    )
    print(conclusion(pairs, args.smoke), flush=True)
    return 0


if __name__ == "__main__":
    exit_with(main)
