"""The served student under load: ``mlflow models serve`` on loopback, concurrent clients.

Starts the scoring server as ``make serve`` does (``mlflow models serve -m MODEL --env-manager
local``, the virtualenv's ``bin`` first on PATH, on 127.0.0.1 and a free port), then ``--clients``
threads send ``--requests`` requests in all, a seeded mix of:

- valid pair-scoring requests (1-8 rows, ``sym`` and ``asym``): must answer 200;
- valid search requests (``query``, ``k``), when the model was logged with an index: 200;
- malformed requests (bad JSON, missing columns, wrong types, a task other than sym/asym, empty
  text, pair and search columns mixed): must answer 4xx with a message;
- oversized requests (more rows than ``d2llm.serving.MAX_ROWS``, a text longer than
  ``MAX_TEXT_CHARS``): must answer 4xx with a message.

It reports latency percentiles (p50/p95/p99, all requests and per kind), counts by status class,
the 5xx count (must be 0), every request whose answer broke its rule, and the server's resident
memory (all processes of its group: the CLI and uvicorn's worker) after warm-up and after each
quarter of the load. The loop is bounded (a fixed number of requests, a timeout per request) and the server is
always stopped. Loopback only: nothing listens beyond 127.0.0.1.

    python -m benchmarks.serve_load                       # models:/d2llm-student@champion
    python -m benchmarks.serve_load --student-dir models/student --index-dir index/cranfield
        # registers that folder in a throwaway store first (the project registry is not touched)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "serve_load"
HOST = "127.0.0.1"
DEFAULT_MODEL = "models:/d2llm-student@champion"
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0
ROUNDS = 4  # the load goes out in this many equal parts, the server's RSS read after each
# Share of each kind in the mix (search requests become pair requests for a model without index).
MIX = {"pairs": 0.4, "search": 0.2, "malformed": 0.3, "oversized": 0.1}
SENTENCES = (
    "a man plays a guitar on the street",
    "a person is playing music outdoors",
    "a woman is slicing an onion in the kitchen",
    "two dogs run through the snow",
    "children are playing football in the park",
    "the aircraft wing was tested in a supersonic wind tunnel",
    "what is the boiling point of water at sea level",
    "water boils at one hundred degrees celsius",
    "how do shock waves form on a wedge",
    "the committee approved the new budget on friday",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    kind: str  # pairs, search, malformed, oversized
    label: str  # what makes it that kind, e.g. "unknown task"
    body: bytes


@dataclass(frozen=True)
class Answer:
    kind: str
    label: str
    status: int  # 0: no HTTP answer (connection error or timeout)
    seconds: float
    message: str  # the error message of a 4xx/5xx answer, else ""


# --------------------------------------------------------------------------- requests


def _split(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    return json.dumps(
        {"dataframe_split": {"columns": list(columns), "data": [list(r) for r in rows]}}
    ).encode()


def malformed_requests() -> list[tuple[str, bytes]]:
    """One request per way of getting it wrong; each must be answered 4xx with a message."""
    pair = ["text_a", "text_b", "task"]
    return [
        ("bad JSON", b'{"dataframe_split": {"columns": ["text_a", '),
        ("not a dataframe", json.dumps({"text_a": "a man"}).encode()),
        ("missing columns", _split(["text_a", "text_b"], [["a man", "a dog"]])),
        ("wrong type", _split(pair, [[5, "a dog", "sym"]])),
        ("unknown task", _split(pair, [["a man", "a dog", "both"]])),
        ("empty text", _split(pair, [["a man", "", "sym"]])),
        ("pairs and query mixed", _split([*pair, "query"], [["a man", "a dog", "sym", "a man"]])),
    ]


def oversized_requests(max_rows: int, max_chars: int) -> list[tuple[str, bytes]]:
    """A request one row over the row limit, and one text one character over the text limit."""
    rows = [
        [SENTENCES[i % len(SENTENCES)], SENTENCES[(i + 1) % len(SENTENCES)], "sym"]
        for i in range(max_rows + 1)
    ]
    long_text = ("a man plays a guitar " * (max_chars // 20 + 1))[: max_chars + 1]
    return [
        ("too many rows", _split(["text_a", "text_b", "task"], rows)),
        ("text too long", _split(["text_a", "text_b", "task"], [[long_text, "a dog", "sym"]])),
    ]


def build_requests(
    count: int, with_search: bool, seed: int, max_rows: int, max_chars: int
) -> list[LoadRequest]:
    """``count`` requests, shuffled with ``seed``: each malformed and oversized variant once (as
    far as ``count`` allows), the rest drawn in the proportions of ``MIX``."""
    rng = random.Random(seed)
    bad = {"malformed": malformed_requests(), "oversized": oversized_requests(max_rows, max_chars)}
    every_variant = [kind for kind, variants in bad.items() for _ in variants][:count]
    kinds = every_variant + rng.choices(list(MIX), weights=list(MIX.values()), k=count - len(every_variant))
    used = dict.fromkeys(bad, 0)
    out = []
    for kind in kinds:
        if kind == "search" and not with_search:
            kind = "pairs"
        if kind == "pairs":
            n = rng.randint(1, 8)
            rows = [[*rng.sample(SENTENCES, 2), rng.choice(["sym", "asym"])] for _ in range(n)]
            out.append(LoadRequest(kind, f"{n} pairs", _split(["text_a", "text_b", "task"], rows)))
        elif kind == "search":
            k = rng.randint(1, 10)
            out.append(LoadRequest(kind, f"k={k}", _split(["query", "k"], [[rng.choice(SENTENCES), k]])))
        else:  # cycle through every way of getting it wrong
            label, body = bad[kind][used[kind] % len(bad[kind])]
            used[kind] += 1
            out.append(LoadRequest(kind, label, body))
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- HTTP


def post(url: str, body: bytes, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, str]:
    """POST JSON; returns (status, body text). Status 0 when no HTTP answer came back."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except OSError as err:  # refused, reset, timed out
        return 0, f"{type(err).__name__}: {err}"


def error_message(text: str) -> str:
    """The ``message`` of an MLflow error body, or "" when there is none.

    The scoring server wraps a prediction error as ``Failed to predict data '<the data>'.
    \\nError: <message>``; only the message after ``Error:`` is kept (the data can be long).
    """
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return ""
    message = str(body.get("message") or "") if isinstance(body, dict) else ""
    if message.startswith("Failed to predict data") and "\nError: " in message:
        message = message.rsplit("\nError: ", 1)[1]
    return message.strip()


def send_all(url: str, requests: Sequence[LoadRequest], clients: int, timeout: float) -> list[Answer]:
    """Every request once, from ``clients`` threads that each take the next unsent request."""
    lock, position = threading.Lock(), iter(range(len(requests)))
    answers: list[Answer | None] = [None] * len(requests)

    def client() -> None:
        while True:
            with lock:
                i = next(position, None)
            if i is None:
                return
            req = requests[i]
            start = time.perf_counter()
            status, text = post(f"{url}/invocations", req.body, timeout)
            seconds = time.perf_counter() - start
            message = error_message(text) if status != 200 else ""
            if status == 0:
                message = text
            answers[i] = Answer(req.kind, req.label, status, seconds, message)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return [a for a in answers if a is not None]


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in the process group ``pgid`` (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:  # fields after the name: state, ppid, pgrp, ...
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we read it
    return total


@contextmanager
def serve(
    model_uri: str, tracking_uri: str, log_file: Path, startup_timeout: float = STARTUP_TIMEOUT_S
) -> Iterator[tuple[str, int]]:
    """``mlflow models serve`` as ``make serve`` runs it, on 127.0.0.1 and a free port.

    Yields (url, process group id); the whole group is stopped on exit, however the block ends.
    """
    port = free_port()
    env = {
        "HF_HUB_OFFLINE": "1",  # the Makefile's defaults; the caller's environment wins
        "TOKENIZERS_PARALLELISM": "false",
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", HOST, "-p", str(port)]
    with log_file.open("w") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"mlflow models serve exited with {server.returncode}:\n{log_file.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not healthy after {startup_timeout:.0f} s:\n{log_file.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url, server.pid
    finally:
        stop_server(server)


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server started in its own session: SIGTERM to its process group, SIGKILL if it hangs."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def register_temporary(student_dir: Path, index_dir: Path | None, root: Path) -> tuple[str, str]:
    """Log and register ``student_dir`` (and ``index_dir``) in a throwaway sqlite store under
    ``root``; returns (model URI, tracking URI)."""
    import mlflow

    from d2llm.config import TrackingConfig
    from d2llm.tracking import configure, log_student

    cfg = TrackingConfig(experiment="serve-load", registered_model="serve-load-student")
    os.environ.pop("D2LLM_MLFLOW_PARENT_RUN_ID", None)
    configure(cfg, root=root)
    settings = {"mode": "full"} if index_dir is not None else None
    version = log_student(
        student_dir, index_dir, registered_model_name=cfg.registered_model, search_settings=settings
    )
    tracking_uri = mlflow.get_tracking_uri()
    return f"models:/{cfg.registered_model}/{version.version}", tracking_uri


# --------------------------------------------------------------------------- the measurement


def percentiles(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds (nearest rank), None for no values."""
    values = sorted(seconds)
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}

    def rank(q: float) -> float:
        return 1000 * values[min(len(values) - 1, max(0, int(-(-q * len(values) // 1)) - 1))]

    return {"p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "max_ms": 1000 * values[-1]}


def status_class(status: int) -> str:
    return "no answer" if status == 0 else f"{status // 100}xx"


def rule_broken(answer: Answer) -> str | None:
    """Why an answer breaks its kind's rule (valid: 200; malformed/oversized: 4xx with a message)."""
    if answer.kind in ("pairs", "search"):
        return None if answer.status == 200 else f"valid request answered {answer.status}"
    if not 400 <= answer.status < 500:
        return f"{answer.kind} request answered {answer.status}, not 4xx"
    if not answer.message.strip():
        return f"{answer.kind} request answered {answer.status} without a message"
    return None


def summarise(answers: Sequence[Answer], wall_s: float) -> dict[str, Any]:
    kinds = sorted({a.kind for a in answers})
    by_class: dict[str, int] = {}
    for a in answers:
        by_class[status_class(a.status)] = by_class.get(status_class(a.status), 0) + 1
    broken = [
        {"kind": a.kind, "label": a.label, "status": a.status, "message": a.message[:300], "why": why}
        for a in answers
        if (why := rule_broken(a)) is not None
    ]
    messages: dict[str, str] = {}
    for a in answers:
        if a.kind in ("malformed", "oversized"):
            messages.setdefault(a.label, f"{a.status}: {a.message[:200]}")
    return {
        "requests": len(answers),
        "wall_seconds": wall_s,
        "requests_per_second": len(answers) / wall_s if wall_s > 0 else None,
        "latency": percentiles([a.seconds for a in answers]),
        "latency_by_kind": {k: percentiles([a.seconds for a in answers if a.kind == k]) for k in kinds},
        "count_by_kind": {k: sum(a.kind == k for a in answers) for k in kinds},
        "count_by_status_class": dict(sorted(by_class.items())),
        "server_errors_5xx": by_class.get("5xx", 0),
        "rule_violations": broken,
        "error_messages": dict(sorted(messages.items())),
    }


def measure(
    model_uri: str,
    tracking_uri: str,
    work_dir: Path,
    requests: int = 300,
    clients: int = 4,
    seed: int = 0,
    timeout: float = REQUEST_TIMEOUT_S,
) -> dict[str, Any]:
    """Serve ``model_uri``, warm it up, send the load, and summarise (see the module docstring)."""
    from d2llm.serving import MAX_ROWS, MAX_TEXT_CHARS

    log_file = work_dir / "server.log"
    with serve(model_uri, tracking_uri, log_file) as (url, pgid):
        # Warm-up (untimed): one request of each valid kind; the search one tells whether the
        # model was logged with an index.
        pair = _split(["text_a", "text_b", "task"], [[SENTENCES[0], SENTENCES[1], "sym"]])
        status, text = post(f"{url}/invocations", pair, timeout)
        if status != 200:
            raise RuntimeError(f"warm-up pair request answered {status}: {text[:500]}")
        status, _ = post(f"{url}/invocations", _split(["query", "k"], [[SENTENCES[6], 3]]), timeout)
        with_search = status == 200
        rss_before = group_rss_bytes(pgid)
        load = build_requests(requests, with_search, seed, MAX_ROWS, MAX_TEXT_CHARS)
        log.info(
            "sending %d requests from %d clients to %s (search: %s)", len(load), clients, url, with_search
        )
        # Sent in ROUNDS equal parts, RSS read after each: memory is flat when the later rounds
        # stop adding to it (the first ones fill allocator caches and per-thread buffers).
        answers: list[Answer] = []
        rss_rounds: list[int] = []
        start = time.perf_counter()
        for r in range(ROUNDS):
            answers += send_all(
                url, load[r * len(load) // ROUNDS : (r + 1) * len(load) // ROUNDS], clients, timeout
            )
            rss_rounds.append(group_rss_bytes(pgid))
        wall = time.perf_counter() - start
        rss_after = rss_rounds[-1]
    result = summarise(answers, wall)
    result.update(
        {
            "model_uri": model_uri,
            "clients": clients,
            "with_search": with_search,
            "limits": {"max_rows": MAX_ROWS, "max_text_chars": MAX_TEXT_CHARS},
            "rss_mib": {
                "after_warmup": rss_before / 2**20,
                "after_load": rss_after / 2**20,
                "growth": (rss_after - rss_before) / 2**20,
                "after_each_round": [b / 2**20 for b in rss_rounds],
                "growth_second_half": (rss_after - rss_rounds[ROUNDS // 2 - 1]) / 2**20,
            },
        }
    )
    return result


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model-uri", default=DEFAULT_MODEL, help="registered model to serve")
    p.add_argument(
        "--tracking-uri", help="its tracking store (default: tracking.tracking_uri, made absolute)"
    )
    p.add_argument("--student-dir", type=Path, help="serve this student folder instead (throwaway registry)")
    p.add_argument("--index-dir", type=Path, help="with --student-dir: its search index")
    p.add_argument("--requests", type=int, default=300, help="requests in all")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    p.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S, help="seconds per request")
    args = p.parse_args(argv)
    for name in ("requests", "clients"):
        common.check_positive(f"--{name}", getattr(args, name))
    if args.index_dir is not None and args.student_dir is None:
        raise SystemExit("--index-dir needs --student-dir")
    return args


def print_report(results: dict[str, Any]) -> None:
    lat = results["latency"]
    print(
        f"\n{results['requests']} requests from {results['clients']} clients to {results['model_uri']} "
        f"in {results['wall_seconds']:.1f} s ({results['requests_per_second']:.1f} req/s); search served: "
        f"{results['with_search']}"
    )
    rows = [["all", results["requests"], lat["p50_ms"], lat["p95_ms"], lat["p99_ms"], lat["max_ms"]]]
    for kind, p in results["latency_by_kind"].items():
        rows.append(
            [kind, results["count_by_kind"][kind], p["p50_ms"], p["p95_ms"], p["p99_ms"], p["max_ms"]]
        )
    print(common.format_table(["requests", "count", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows))
    print(f"status classes: {results['count_by_status_class']}; 5xx: {results['server_errors_5xx']}")
    rss = results["rss_mib"]
    print(
        f"server RSS: {rss['after_warmup']:.0f} MiB after warm-up, "
        f"{rss['after_load']:.0f} MiB after the load ({rss['growth']:+.0f} MiB); after each quarter: "
        f"{', '.join(f'{m:.0f}' for m in rss['after_each_round'])} MiB "
        f"(second half {rss['growth_second_half']:+.0f} MiB)"
    )
    for label, message in results["error_messages"].items():
        print(f"  {label}: {message[:140]}")
    if results["rule_violations"]:
        print(f"RULE VIOLATIONS ({len(results['rule_violations'])}):")
        for v in results["rule_violations"][:20]:
            print(f"  {v}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv, args, params = common.start(argv, parse_args)
    with tempfile.TemporaryDirectory(prefix="d2llm-serve-load-") as tmp:
        work = Path(tmp)
        if args.student_dir is not None:
            model_uri, tracking_uri = register_temporary(args.student_dir, args.index_dir, work)
        else:
            from d2llm.tracking.runs import resolve_tracking_uri

            model_uri = args.model_uri
            tracking_uri = args.tracking_uri or resolve_tracking_uri(params.tracking.tracking_uri, Path.cwd())
        results = measure(model_uri, tracking_uri, work, args.requests, args.clients, args.seed, args.timeout)
    path = common.write_report(NAME, args.out_dir, argv, results)
    print_report(results)
    print(f"wrote {path}")
    if results["server_errors_5xx"] or results["rule_violations"]:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
