"""End-to-end tests of the Python client against the real ``fairrank serve`` binary.

A small synthetic table pair (2000 items x 16 dims, 50 users) is built with
``fairrank table build`` into a temporary folder; the server is started on a free
loopback port and called through the stubs generated from ``proto/``. Answers are
checked against the exact top-k of ``fairrank topk`` and against the Rust CLI client
``fairrank rank``, so a Python caller is shown to get the same ranking as a Rust one.

The binary is ``$FAIRRANK_BIN``, else ``$CARGO_TARGET_DIR/debug/fairrank``, else
``target/debug/fairrank`` of this repository (build it with ``cargo build -p server``).
Run with ``python -m pytest examples/python``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import client as fr
from client import FairrankClient, FairrankError, build_rank_request

EXAMPLE_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLE_DIR.parent.parent
ITEMS = 2000
USERS = 50
DIM = 16
SEED = 20261129
START_TIMEOUT_S = 120.0
"""Longest the server may take to announce its address on a loaded machine."""
STOP_TIMEOUT_S = 60.0
"""Longest a SIGTERM'd server may take to drain and exit."""
CALL_TIMEOUT_S = 30.0


def fairrank_binary() -> Path:
    """The ``fairrank`` binary under test."""
    if "FAIRRANK_BIN" in os.environ:
        return Path(os.environ["FAIRRANK_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    if not target.is_absolute():
        target = REPO_ROOT / target
    return target / "debug" / "fairrank"


def run_fairrank(*args: str | Path) -> str:
    """Runs a ``fairrank`` subcommand to completion and returns its stdout."""
    result = subprocess.run(
        [str(fairrank_binary()), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"fairrank {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}"
    )
    return result.stdout


def user_id(row: int) -> str:
    """Id of a user table row (the synthetic generator names users ``u`` + 6 digits)."""
    return f"u{row:06d}"


def item_id(row: int) -> str:
    """Id of an item table row (the synthetic generator names items ``i`` + 7 digits)."""
    return f"i{row:07d}"


def write_npy_f32(path: Path, rows: list[list[float]]) -> None:
    """Writes a 2-D float32 ``.npy`` file (format version 1.0) without NumPy."""
    dim = len(rows[0])
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({len(rows)}, {dim}), }}"
    # Magic (6) + version (2) + header length (2) + header, padded to a multiple of 64.
    padding = -(10 + len(header) + 1) % 64
    header_bytes = (header + " " * padding + "\n").encode("latin1")
    body = b"".join(struct.pack(f"<{dim}f", *row) for row in rows)
    path.write_bytes(
        b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header_bytes)) + header_bytes + body
    )


def exact_topk(
    items: Path, *, users: Path | None = None, limit: int = 1, queries: Path | None = None, k: int
) -> list[dict]:
    """``fairrank topk`` answers, one ``{"query", "ids", "scores"}`` dict per query."""
    args: list[str | Path] = ["topk", "--table", items, "--k", str(k), "--format", "json"]
    if queries is not None:
        args += ["--queries", queries]
    else:
        assert users is not None
        args += ["--users", users, "--limit", str(limit)]
    return [json.loads(line) for line in run_fairrank(*args).splitlines() if line.strip()]


def assert_matches_exact(response: fr.ranker_pb2.RankResponse, expected: dict, k: int) -> None:
    """The answer is the exact top-k: same ids in the same order, the same scores."""
    assert len(response.items) == k
    assert [item.item_id for item in response.items] == expected["ids"][:k]
    assert [item.rank for item in response.items] == list(range(1, k + 1))
    assert response.score_kind == fr.ranker_pb2.SCORE_KIND_DOT_PRODUCT
    scores = [item.score for item in response.items]
    assert all(item.HasField("score") for item in response.items)
    assert scores == sorted(scores, reverse=True), scores
    for got, want in zip(scores, expected["scores"][:k], strict=True):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5), (got, want)


class ServerProcess:
    """A ``fairrank serve`` child process on a free loopback port."""

    def __init__(self, tables: dict[str, Path], admin_token: str, *, config: str | None = None):
        workdir = tables["dir"]
        args: list[str] = [
            str(fairrank_binary()),
            "serve",
            "--table",
            str(tables["items"]),
            "--users",
            str(tables["users"]),
            "--addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ]
        if config is not None:
            config_path = workdir / f"config-{secrets.token_hex(4)}.toml"
            config_path.write_text(config)
            args += ["--config", str(config_path)]
        self.log_path = workdir / f"server-{secrets.token_hex(4)}.log"
        # Each server its own state directory (one server per state database).
        state_dir = workdir / f"state-{secrets.token_hex(4)}"
        env = dict(os.environ, FAIRRANK_ADMIN_TOKEN=admin_token)
        env["FAIRRANK_STATE_DIR"] = str(state_dir)
        env.setdefault("RUST_LOG", "info")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
            )
        self.address = self._wait_for_address()

    def _wait_for_address(self) -> str:
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.kill()
                pytest.fail(f"the server did not announce its address:\n{self.log()}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.process.wait()
                pytest.fail(f"the server exited with {code} before listening:\n{self.log()}")
            if line.startswith("listening on "):
                return line.removeprefix("listening on ").strip()

    def log(self) -> str:
        """The server's stderr so far."""
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> int:
        """Sends SIGTERM and returns the exit status once the server has drained."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the server did not exit within {STOP_TIMEOUT_S} s of SIGTERM")


@pytest.fixture(scope="session")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic item and user table built by ``fairrank table build``."""
    if not fairrank_binary().is_file():
        pytest.fail(
            f"{fairrank_binary()} is missing: build it with `cargo build -p server` "
            "or point FAIRRANK_BIN at it"
        )
    workdir = tmp_path_factory.mktemp("tables")
    items, users = workdir / "items.frt", workdir / "users.frt"
    run_fairrank(
        "table",
        "build",
        "--synthetic",
        "--items",
        str(ITEMS),
        "--dim",
        str(DIM),
        "--users",
        str(USERS),
        "--seed",
        str(SEED),
        "-o",
        items,
        "--users-out",
        users,
    )
    return {"dir": workdir, "items": items, "users": users}


@pytest.fixture(scope="session")
def admin_token() -> str:
    return "py-admin-" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def server(tables: dict[str, Path], admin_token: str) -> Iterator[ServerProcess]:
    """The server shared by the tests that do not stop it."""
    process = ServerProcess(tables, admin_token)
    yield process
    assert process.terminate() == 0, process.log()


@pytest.fixture()
def fairrank(server: ServerProcess) -> Iterator[FairrankClient]:
    with FairrankClient(server.address, timeout=CALL_TIMEOUT_S) as connection:
        connection.wait_until_ready()
        yield connection


def test_health_reports_serving(fairrank: FairrankClient) -> None:
    assert fairrank.health() == "SERVING"
    assert fairrank.health("fairrank.v1.Ranker") == "SERVING"


def test_whole_catalog_ranking_is_the_exact_top_k(fairrank: FairrankClient, tables) -> None:
    k = 10
    expected = exact_topk(tables["items"], users=tables["users"], limit=3, k=k)
    assert len(expected) == 3
    for row, want in enumerate(expected):
        request = build_rank_request(user_id=user_id(row), k=k, constraint="none")
        response = fairrank.rank(request)
        assert response.request_id == request.request_id
        assert response.personalized
        assert response.scored_items == ITEMS
        assert response.HasField("users_table")
        assert response.fairness.constraint == "none"
        assert_matches_exact(response, want, k)


def test_candidate_ranking_matches_the_rust_client(
    fairrank: FairrankClient, server, tables
) -> None:
    k = 10
    top = exact_topk(tables["items"], users=tables["users"], limit=1, k=30)[0]
    # The true top 30 hidden among 70 other items, in random order: the top k of the list
    # must be the top k of the catalog.
    shuffle = random.Random(SEED)
    others = [
        item_id(row) for row in shuffle.sample(range(ITEMS), 200) if item_id(row) not in top["ids"]
    ]
    candidates = top["ids"] + others[:70]
    shuffle.shuffle(candidates)

    response = fairrank.rank(
        build_rank_request(user_id=user_id(0), candidates=candidates, k=k, constraint="none")
    )
    assert response.scored_items == len(candidates)
    assert_matches_exact(response, top, k)

    rust = json.loads(
        run_fairrank(
            "rank",
            "--addr",
            server.address,
            "--user",
            user_id(0),
            "--candidates",
            ",".join(candidates),
            "--k",
            str(k),
            "--constraint",
            "none",
            "--format",
            "json",
        )
    )
    assert [item["item_id"] for item in rust["items"]] == [item.item_id for item in response.items]
    for rust_item, item in zip(rust["items"], response.items, strict=True):
        assert math.isclose(rust_item["score"], item.score, rel_tol=1e-6), (rust_item, item)


def test_inline_embedding_ranking_is_the_exact_top_k(fairrank: FairrankClient, tables) -> None:
    k = 7
    generator = random.Random(SEED + 1)
    embedding = [generator.uniform(-1.0, 1.0) for _ in range(DIM)]
    queries = tables["dir"] / "inline-query.npy"
    write_npy_f32(queries, [embedding])
    want = exact_topk(tables["items"], queries=queries, k=k)[0]

    response = fairrank.rank(
        build_rank_request(embedding=embedding, subject_id="py-subject", k=k, constraint="none")
    )
    assert response.personalized
    assert not response.HasField("users_table"), "an inline user reads no user table"
    assert_matches_exact(response, want, k)


@pytest.mark.parametrize(
    ("label", "arguments", "code", "reason", "field", "mentions"),
    [
        (
            "k zero",
            {"user_id": user_id(0), "k": 0},
            "INVALID_ARGUMENT",
            "ERROR_REASON_INVALID_FIELD",
            "k",
            [],
        ),
        (
            "pool below k",
            {"user_id": user_id(0), "k": 10, "pool_size": 5},
            "INVALID_ARGUMENT",
            "ERROR_REASON_INVALID_FIELD",
            "pool_size",
            [],
        ),
        (
            "wrong dimension",
            {"embedding": [0.5] * (DIM - 1), "k": 5},
            "INVALID_ARGUMENT",
            "ERROR_REASON_DIMENSION_MISMATCH",
            "inline_user.embedding",
            [str(DIM), str(DIM - 1)],
        ),
        (
            "NaN",
            {"embedding": [0.5] * 3 + [float("nan")] + [0.5] * (DIM - 4), "k": 5},
            "INVALID_ARGUMENT",
            "ERROR_REASON_INVALID_FIELD",
            "inline_user.embedding",
            ["NaN"],
        ),
        (
            "empty request id",
            {"user_id": user_id(0), "k": 5, "request_id": ""},
            "INVALID_ARGUMENT",
            "ERROR_REASON_INVALID_FIELD",
            "request_id",
            [],
        ),
        (
            "unknown constraint",
            {"user_id": user_id(0), "k": 5, "constraint": "no-such-rule"},
            "INVALID_ARGUMENT",
            "ERROR_REASON_UNKNOWN_CONSTRAINT",
            "fairness.constraint",
            ["no-such-rule", "fa*ir", "none"],  # names the registered constraints
        ),
        (
            "unknown parameter",
            {"user_id": user_id(0), "k": 5, "constraint": "none", "params": {"alpha": 0.1}},
            "INVALID_ARGUMENT",
            "ERROR_REASON_INVALID_CONSTRAINT_PARAMS",
            "fairness.params.alpha",
            [],
        ),
        (
            "unknown user",
            {"user_id": "nobody-here", "k": 5},
            "NOT_FOUND",
            "ERROR_REASON_USER_NOT_FOUND",
            "user_id",
            ["nobody-here"],
        ),
        (
            "unknown candidate",
            {"user_id": user_id(0), "k": 1, "candidates": [item_id(1), "ghost-item"]},
            "NOT_FOUND",
            "ERROR_REASON_ITEM_NOT_FOUND",
            "candidate_ids",
            ["ghost-item"],
        ),
        (
            "duplicate candidate",
            {"user_id": user_id(0), "k": 1, "candidates": [item_id(1), item_id(2), item_id(1)]},
            "INVALID_ARGUMENT",
            "ERROR_REASON_INVALID_FIELD",
            "candidate_ids",
            [item_id(1)],
        ),
    ],
)
def test_bad_input_gets_its_code_reason_and_field(
    fairrank: FairrankClient, label, arguments, code, reason, field, mentions
) -> None:
    with pytest.raises(FairrankError) as caught:
        fairrank.rank(build_rank_request(**arguments))
    error = caught.value
    assert error.code == getattr(grpc.StatusCode, code), (label, str(error))
    assert error.reason == reason, (label, str(error))
    assert error.field == field, (label, str(error))
    assert field in error.message, (label, error.message)
    for text in mentions:
        assert text in error.message, (label, text, error.message)


def test_admin_needs_the_bearer_token(server: ServerProcess, admin_token: str) -> None:
    for token in (None, "wrong-" + admin_token):
        with FairrankClient(server.address, admin_token=token, timeout=CALL_TIMEOUT_S) as anonymous:
            with pytest.raises(FairrankError) as caught:
                anonymous.status()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED, str(caught.value)
        assert caught.value.reason == "ERROR_REASON_ADMIN_TOKEN_INVALID"

    with FairrankClient(server.address, admin_token=admin_token, timeout=CALL_TIMEOUT_S) as admin:
        status = admin.status()
    assert status.items_table.rows == ITEMS
    assert status.items_table.dim == DIM
    assert status.users_table.rows == USERS
    assert "provider_group" in status.items_table.group_attributes
    assert "none" in status.fairness_constraints
    assert admin_token not in status.config, "the effective config must redact the token"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_describes_the_api(fairrank: FairrankClient, version: str) -> None:
    services = fairrank.list_services(version)
    for name in ("fairrank.v1.Ranker", "fairrank.v1.Admin", "grpc.health.v1.Health"):
        assert name in services, services
    files = fairrank.file_descriptors_for_symbol("fairrank.v1.Ranker", version)
    ranker = next(file for file in files if file.name == "fairrank/v1/ranker.proto")
    (service,) = [service for service in ranker.service if service.name == "Ranker"]
    assert {method.name for method in service.method} == {"Rank", "RankBatch"}


def test_reflection_unknown_names_are_key_errors(fairrank: FairrankClient) -> None:
    """grpcio-reflection's descriptor database: an unknown name raises the documented
    ``KeyError`` (the server answers NOT_FOUND inside the reflection stream), and the same
    database resolves known names afterwards."""
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(fairrank.channel))
    with pytest.raises(KeyError):
        pool.FindMessageTypeByName("fairrank.v1.DoesNotExist")
    method = pool.FindMethodByName("fairrank.v1.Ranker.Rank")
    assert method.input_type.full_name == "fairrank.v1.RankRequest"
    assert pool.FindMessageTypeByName("google.protobuf.Struct.FieldsEntry").fields


def group_exposure(response: fr.ranker_pb2.RankResponse, attribute_index: int) -> dict[int, float]:
    """Each group's share of the DCG exposure 1 / log2(1 + rank) of the answer."""
    exposure: dict[int, float] = {}
    for item in response.items:
        group = item.group_labels[attribute_index]
        exposure[group] = exposure.get(group, 0.0) + 1.0 / math.log2(1.0 + item.rank)
    total = sum(exposure.values())
    return {group: value / total for group, value in exposure.items()}


def check_fairness_report(response: fr.ranker_pb2.RankResponse, attribute_name: str) -> None:
    """The fairness report agrees with the items it describes (definitions in fairness.proto)."""
    report = response.fairness
    assert report.group_attribute == attribute_name
    assert 0.0 <= report.ndcg_vs_unconstrained <= 1.0 + 1e-9
    unconstrained_ranks = [item.unconstrained_rank for item in response.items]
    assert len(set(unconstrained_ranks)) == len(unconstrained_ranks), unconstrained_ranks
    assert all(1 <= rank <= response.pool_size for rank in unconstrained_ranks)
    attribute = list(response.group_attributes).index(attribute_name)
    shares = group_exposure(response, attribute)
    counts: dict[int, int] = {}
    for item in response.items:
        label = item.group_labels[attribute]
        counts[label] = counts.get(label, 0) + 1
    groups = [group.group for group in report.groups]
    assert groups == sorted(groups)
    assert set(counts) <= set(groups), "every group in the answer is in the pool"
    for group in report.groups:
        assert group.items_returned == counts.get(group.group, 0)
        assert group.items_in_pool >= group.items_returned
        assert math.isclose(group.exposure_share, shares.get(group.group, 0.0), abs_tol=1e-6)
    assert math.isclose(sum(group.exposure_share for group in report.groups), 1.0, abs_tol=1e-6)
    total_unconstrained = sum(group.unconstrained_exposure_share for group in report.groups)
    assert math.isclose(total_unconstrained, 1.0, abs_tol=1e-6)
    assert sum(group.items_in_pool for group in report.groups) == response.pool_size
    if report.satisfied:
        assert not report.violations
        assert report.fallback == fr.fairness_pb2.FAIRNESS_FALLBACK_NONE
    else:
        assert report.violations
        assert report.fallback != fr.fairness_pb2.FAIRNESS_FALLBACK_NONE


def test_unconstrained_answer_reports_its_exposure(fairrank: FairrankClient) -> None:
    k = 20
    response = fairrank.rank(
        build_rank_request(
            user_id=user_id(2),
            k=k,
            pool_size=200,
            constraint="none",
            group_attribute="provider_group",
            explain="text",
        )
    )
    assert len(response.items) == k
    assert response.pool_size == 200
    assert all(item.explanation.reasons for item in response.items)
    check_fairness_report(response, "provider_group")
    report = response.fairness
    assert report.constraint == "none"
    assert report.satisfied
    assert math.isclose(report.ndcg_vs_unconstrained, 1.0)
    assert [item.unconstrained_rank for item in response.items] == list(range(1, k + 1))
    for group in report.groups:
        assert math.isclose(group.exposure_share, group.unconstrained_exposure_share)


def test_fa_ir_policy_is_applied(server: ServerProcess, admin_token) -> None:
    with FairrankClient(server.address, admin_token=admin_token, timeout=CALL_TIMEOUT_S) as admin:
        registered = list(admin.status().fairness_constraints)
        k, protected = 20, 1
        request = build_rank_request(
            user_id=user_id(2),
            k=k,
            pool_size=200,
            constraint="fa*ir",
            params={"p": 0.5, "alpha": 0.1, "protected": protected},
            group_attribute="provider_group",
            on_infeasible="best-effort",
        )
        assert "fa*ir" in registered, registered
        response = admin.rank(request)
        unconstrained = admin.rank(
            build_rank_request(user_id=user_id(2), k=k, pool_size=200, constraint="none")
        )
    assert response.fairness.constraint == "fa*ir"
    assert len(response.items) == k
    check_fairness_report(response, "provider_group")
    protected_group = next(g for g in response.fairness.groups if g.group == protected)
    assert math.isclose(protected_group.target_share, 0.5)
    # FA*IR only ever moves protected items up, so the protected group never gets fewer
    # places than in the unconstrained top k.
    attribute = list(response.group_attributes).index("provider_group")

    def protected_count(answer: fr.ranker_pb2.RankResponse) -> int:
        return sum(1 for item in answer.items if item.group_labels[attribute] == protected)

    assert protected_count(response) >= protected_count(unconstrained)


def test_consent_denied_is_not_personalized(fairrank: FairrankClient) -> None:
    response = fairrank.rank(build_rank_request(user_id=user_id(3), k=5, consent="denied"))
    assert not response.personalized
    assert response.non_personalized_reason == fr.privacy_pb2.NON_PERSONALIZED_REASON_CONSENT_DENIED
    assert not response.HasField("users_table"), "the user's embedding is not read"
    assert response.score_kind in (
        fr.ranker_pb2.SCORE_KIND_PRIOR,
        fr.ranker_pb2.SCORE_KIND_WITHHELD,
    )
    assert len(response.items) == 5


def test_privacy_policy_is_applied(fairrank: FairrankClient) -> None:
    request = build_rank_request(user_id=user_id(4), k=5, privacy_mechanism="gumbel-top-k", rho=0.5)
    response = fairrank.rank(request)
    assert response.privacy.dp_applied
    assert response.privacy.mechanism == fr.privacy_pb2.PRIVACY_MECHANISM_GUMBEL_TOP_K
    assert response.privacy.rho_charged <= 0.5 + 1e-12
    assert response.score_kind == fr.ranker_pb2.SCORE_KIND_WITHHELD
    assert not any(item.HasField("score") for item in response.items)


def test_rank_batch_answers_each_entry(fairrank: FairrankClient, tables) -> None:
    expected = exact_topk(tables["items"], users=tables["users"], limit=2, k=5)
    good = [build_rank_request(user_id=user_id(row), k=5, constraint="none") for row in range(2)]
    bad = build_rank_request(user_id=user_id(0), k=0)
    response = fairrank.rank_batch([good[0], bad, good[1]])
    assert [result.WhichOneof("outcome") for result in response.results] == [
        "response",
        "error",
        "response",
    ]
    assert_matches_exact(response.results[0].response, expected[0], 5)
    assert_matches_exact(response.results[2].response, expected[1], 5)
    error = response.results[1].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.reason == fr.common_pb2.ERROR_REASON_INVALID_FIELD
    assert error.field == "k"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE_DIR / "client.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_command_line(fairrank: FairrankClient, server: ServerProcess) -> None:
    address = ["--addr", server.address]
    result = run_cli(
        "rank",
        *address,
        "--user",
        user_id(1),
        "--k",
        "5",
        "--constraint",
        "none",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    library = fairrank.rank(build_rank_request(user_id=user_id(1), k=5, constraint="none"))
    assert [item["item_id"] for item in answer["items"]] == [i.item_id for i in library.items]
    assert answer["personalized"] is True
    assert answer["score_kind"] == "SCORE_KIND_DOT_PRODUCT"

    result = run_cli("rank", *address, "--user", user_id(1), "--k", "5", "--explain", "text")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2].split() == ["rank", "item", "score", "before", "groups"]
    for item in library.items:
        assert any(line.split()[:2] == [str(item.rank), item.item_id] for line in lines), lines
    assert any(line.startswith("fairness: constraint ") for line in lines), lines

    result = run_cli("rank", *address, "--user", user_id(1), "--k", "0")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "field `k`" in result.stderr, result.stderr

    result = run_cli("health", *address)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr
    result = run_cli("services", *address)
    assert result.returncode == 0 and "fairrank.v1.Ranker" in result.stdout.split(), result


def test_sigterm_reports_not_serving_then_exits_zero(tables, admin_token: str) -> None:
    # A shutdown delay keeps the listener open while health says NOT_SERVING, so load
    # balancers can stop routing; the server then drains and exits 0.
    process = ServerProcess(tables, admin_token, config="[server]\nshutdown_delay_ms = 5000\n")
    try:
        with FairrankClient(process.address, timeout=CALL_TIMEOUT_S) as connection:
            connection.wait_until_ready()
            assert connection.health() == "SERVING"
            connection.rank(build_rank_request(user_id=user_id(0), k=3))
            process.process.send_signal(signal.SIGTERM)
            statuses = []
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline and process.process.poll() is None:
                try:
                    statuses.append(connection.health())
                except FairrankError:
                    break  # the listener closed
                if statuses[-1] == "NOT_SERVING":
                    break
                time.sleep(0.05)
            assert "NOT_SERVING" in statuses, (statuses, process.log())
    finally:
        code = process.terminate()
    assert code == 0, process.log()
