"""h2load (Debian's nghttp2-client) as the load generator for the one-request cases.

GetAdAccount, the echo RPC and the REST GET each send the same request again and again,
which h2load does from C at a few per cent of one CPU: on a 2-CPU machine, the Python
load processes took a large share of the cores the servers under test need, and capped
the fastest servers more than the slower ones. gRPC over h2load is plain HTTP/2: a POST
whose body is a gRPC frame (a 5-byte header, then the serialized request). The REST
baseline gets HTTP/1.1 with one connection per call in flight, like a pooled client.

h2load counts any HTTP 200 as a success, and a gRPC error is an HTTP 200 with the status
in its trailers and no response message. So each gRPC case first makes one real call
to learn the size of its answer, and every response short of a message counts as an error.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
from adaccounts.v1 import ad_accounts_pb2 as pb
from loadgen import ECHO_METHOD, Outcome

GET_METHOD = "/adaccounts.v1.AdAccountService/GetAdAccount"
CASES = ("get", "echo", "rest_get")


def installed() -> bool:
    return shutil.which("h2load") is not None


class H2load:
    def __init__(self, workdir: Path, profile: Any, account_id: str, in_flight: int, connections: int) -> None:
        self._workdir = workdir
        self._warmup_s = profile.warmup_s
        self._duration_s = profile.duration_s
        self._account_id = account_id
        self._in_flight = in_flight
        self._connections = connections
        request = pb.GetAdAccountRequest(id=account_id).SerializeToString()
        self._body = workdir / "get_request.grpc"
        self._body.write_bytes(b"\x00" + struct.pack(">I", len(request)) + request)

    def measure(self, case: str, port: int) -> Outcome:
        """One case over the same window as the Python load processes use."""
        log_file = self._workdir / f"h2load-{case}.log"
        if case == "rest_get":
            url = f"http://127.0.0.1:{port}/ad_accounts/{self._account_id}"
            shape = ["--h1", "-c", str(self._in_flight), "-m", "1"]
            answer_bytes = None
        else:
            method = GET_METHOD if case == "get" else ECHO_METHOD
            url = f"http://127.0.0.1:{port}{method}"
            per_connection = max(1, self._in_flight // self._connections)
            shape = ["-c", str(self._connections), "-m", str(per_connection), "-d", str(self._body)]
            shape += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
            answer_bytes = self._answer_bytes(port, method)
        command = ["h2load", "-D", _ms(self._duration_s), "--warm-up-time", _ms(self._warmup_s)]
        command += ["--log-file", str(log_file), *shape, url]
        started = time.time()
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=self._warmup_s + self._duration_s + 60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"h2load failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}")
        return self._outcome(result.stdout, log_file, started + self._warmup_s, answer_bytes)

    def _outcome(self, output: str, log_file: Path, measured_from: float, answer_bytes: int | None) -> Outcome:
        rate = float(_find(r"finished in [\d.]+\w+, ([\d.]+) req/s", output))
        done = int(_find(r"requests: .*?(\d+) done", output))
        errors = done - int(_find(r"requests: .*?(\d+) succeeded", output))  # HTTP status >= 400, resets
        first_error = "HTTP errors" if errors else ""
        if answer_bytes is not None:
            # Responses without a message. A call in flight at either edge of the window may
            # count in one figure and not the other: a shortfall up to that is not an error.
            missing = done - int(_find(r"\((\d+)\) data", output)) // answer_bytes
            if missing > self._in_flight:
                errors += missing
                first_error = first_error or "gRPC responses without a message (an error status)"
        latencies = []
        for line in log_file.read_text().splitlines():
            started_us, _status, took_us = line.split("\t")[:3]
            if int(started_us) / 1e6 >= measured_from:
                latencies.append(int(took_us) / 1e6)
        calls = round(rate * self._duration_s)
        return Outcome(calls=calls, errors=errors, first_error=first_error, latencies=latencies)

    def _answer_bytes(self, port: int, method: str) -> int:
        """The size on the wire of this case's answer: a 5-byte frame header and the message."""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                method,
                request_serializer=pb.GetAdAccountRequest.SerializeToString,
                response_deserializer=pb.AdAccount.FromString,
            )
            answer = call(pb.GetAdAccountRequest(id=self._account_id), timeout=10)
        return 5 + answer.ByteSize()


def _ms(seconds: float) -> str:
    """A <DURATION> for h2load, which takes whole numbers only."""
    return f"{round(seconds * 1000)}ms"


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"h2load printed no {pattern!r}:\n{text[-2000:]}")
    return match.group(1)
