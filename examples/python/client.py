"""A Python client of the fairrank gRPC API (fairrank.v1): a small library and a CLI.

The stubs are generated from the repository's ``proto/`` with grpcio-tools on first
import (see ``generate.py``); nothing else about the API is hand-written here, which is
the point of this example: any language with a protobuf compiler can call fairrank.

Library::

    from client import FairrankClient, build_rank_request

    with FairrankClient("127.0.0.1:50051") as fairrank:
        response = fairrank.rank(build_rank_request(user_id="u000000", k=10))
        for item in response.items:
            print(item.rank, item.item_id, item.score)

Command line (``python client.py --help``)::

    python client.py rank --addr 127.0.0.1:50051 --user u000000 --k 10 --explain text
    python client.py rank --embedding 0.1,0.2,... --candidates i0000001,i0000002 --k 2 --format json
    python client.py rank --user u000000 --constraint 'fa*ir' --params '{"p":0.5,"protected":1}'
    python client.py health
    python client.py services
    FAIRRANK_ADMIN_TOKEN=... python client.py status

Errors are raised as :class:`FairrankError`, which carries the gRPC code and the
server's machine-readable reason and field (response metadata ``fairrank-error-reason``
and ``fairrank-error-field``); the CLI prints them and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from generate import ensure_generated

sys.path.insert(0, str(ensure_generated()))

from fairrank.v1 import (  # noqa: E402  (generated on the line above)
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    fairness_pb2,
    privacy_pb2,
    ranker_pb2,
    ranker_pb2_grpc,
)

__all__ = [
    "ADMIN_TOKEN_ENV",
    "ERROR_FIELD_KEY",
    "ERROR_REASON_KEY",
    "FairrankClient",
    "FairrankError",
    "admin_pb2",
    "build_rank_request",
    "common_pb2",
    "fairness_pb2",
    "format_table",
    "main",
    "privacy_pb2",
    "ranker_pb2",
    "response_to_dict",
]

ERROR_REASON_KEY = "fairrank-error-reason"
"""Response metadata key with the :class:`common_pb2.ErrorReason` name of an error."""

ERROR_FIELD_KEY = "fairrank-error-field"
"""Response metadata key with the path of the request field at fault, when there is one."""

ADMIN_TOKEN_ENV = "FAIRRANK_ADMIN_TOKEN"
"""Environment variable the CLI reads the admin bearer token from (the server's default)."""

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""The server's default listen address."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message this client sends or accepts (whole-catalog answers with large k)."""


class FairrankError(Exception):
    """A call that the server (or the transport) answered with an error status."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, field: str | None) -> None:
        super().__init__(code, message, reason, field)
        self.code = code
        """The gRPC status code, for example ``grpc.StatusCode.INVALID_ARGUMENT``."""
        self.message = message
        """The server's human-readable message (it names the field or item at fault)."""
        self.reason = reason
        """The ``ErrorReason`` name, ``ERROR_REASON_UNSPECIFIED`` when the server sent none."""
        self.field = field
        """Path of the request field at fault (for example ``k`` or ``fairness.params.p``)."""

    def __str__(self) -> str:
        field = f", field `{self.field}`" if self.field else ""
        return f"{self.code.name} ({self.reason}{field}): {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FairrankError:
        """Reads the code, message, reason and field of a failed call."""
        metadata: dict[str, str] = {}
        for source in (error.initial_metadata, error.trailing_metadata):
            for key, value in source() or ():
                if isinstance(value, str):
                    metadata[key] = value
        return cls(
            code=error.code(),
            message=error.details() or "",
            reason=metadata.get(ERROR_REASON_KEY, "ERROR_REASON_UNSPECIFIED"),
            field=metadata.get(ERROR_FIELD_KEY),
        )


def _enum_value(enum: Any, prefix: str, name: str | int | None) -> int:
    """The number of an enum value given as a number, a full name or a short name.

    ``_enum_value(ranker_pb2.ExplainLevel, "EXPLAIN_LEVEL_", "text")`` is the number of
    ``EXPLAIN_LEVEL_TEXT``. ``None`` is 0, the UNSPECIFIED (server default) value.
    """
    if name is None:
        return 0
    if isinstance(name, int):
        return name
    full = name.upper().replace("-", "_")
    if not full.startswith(prefix):
        full = prefix + full
    try:
        return enum.Value(full)
    except ValueError:
        names = ", ".join(
            value.name[len(prefix) :].lower().replace("_", "-")
            for value in enum.DESCRIPTOR.values
            if not value.name.endswith("_UNSPECIFIED")
        )
        raise ValueError(f"unknown value {name!r}; expected one of: {names}") from None


def _enum_name(enum: Any, number: int) -> str:
    """The name of an enum number; unknown numbers (a newer server) read as UNSPECIFIED."""
    try:
        return enum.Name(number)
    except ValueError:
        return enum.DESCRIPTOR.values[0].name


def _status_code(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a numeric code (``UNKNOWN`` for numbers it lacks)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def build_rank_request(
    *,
    user_id: str | None = None,
    embedding: Sequence[float] | None = None,
    subject_id: str = "",
    fallback_for_unknown_user: bool = False,
    candidates: Iterable[str] = (),
    skip_unknown_candidates: bool = False,
    k: int = 10,
    pool_size: int | None = None,
    constraint: str | None = None,
    params: Mapping[str, Any] | None = None,
    group_attribute: str | None = None,
    exposure_scope: str | None = None,
    on_infeasible: str | int | None = None,
    privacy_mechanism: str | int | None = None,
    rho: float | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    release_noisy_scores: bool = False,
    on_budget_exhausted: str | int | None = None,
    consent: str | int | None = None,
    consent_reference: str = "",
    explain: str | int | None = None,
    max_dimensions: int = 0,
    request_id: str | None = None,
) -> ranker_pb2.RankRequest:
    """Builds a ``RankRequest`` from plain Python values.

    Exactly one of ``user_id`` and ``embedding`` names the user. Empty ``candidates``
    ranks the whole catalog. Enum arguments take a short lower-case name (``"text"``,
    ``"best-effort"``, ``"gumbel-top-k"``, ``"denied"``), a full name or a number;
    ``None`` leaves the server default. A fairness or privacy policy is sent only when
    one of its arguments is given. ``request_id`` defaults to a fresh UUID.

    Raises ``ValueError`` for arguments that cannot form a request at all (no or two
    users, both ``rho`` and ``epsilon``, an unknown enum name); everything else,
    including ranges, is left for the server to validate and report.
    """
    if (user_id is None) == (embedding is None):
        raise ValueError("give exactly one of user_id and embedding")
    if rho is not None and epsilon is not None:
        raise ValueError("give at most one of rho and epsilon")
    request = ranker_pb2.RankRequest(
        request_id=request_id if request_id is not None else f"py-{uuid.uuid4()}",
        fallback_for_unknown_user=fallback_for_unknown_user,
        candidate_ids=list(candidates),
        skip_unknown_candidates=skip_unknown_candidates,
        k=k,
    )
    if user_id is not None:
        request.user_id = user_id
    else:
        request.inline_user.embedding.extend(float(value) for value in embedding or ())
        request.inline_user.subject_id = subject_id
    if pool_size is not None:
        request.pool_size = pool_size
    if any(
        value is not None
        for value in (constraint, params, group_attribute, exposure_scope, on_infeasible)
    ):
        fairness = request.fairness
        fairness.constraint = constraint or ""
        if params is not None:
            fairness.params.update(dict(params))
        fairness.group_attribute = group_attribute or ""
        fairness.exposure_scope = exposure_scope or ""
        fairness.on_infeasible = _enum_value(
            fairness_pb2.InfeasibleAction, "INFEASIBLE_ACTION_", on_infeasible
        )
    if (
        any(
            value is not None
            for value in (privacy_mechanism, rho, epsilon, delta, on_budget_exhausted)
        )
        or release_noisy_scores
    ):
        privacy = request.privacy
        privacy.mechanism = _enum_value(
            privacy_pb2.PrivacyMechanism, "PRIVACY_MECHANISM_", privacy_mechanism
        )
        if rho is not None:
            privacy.rho = rho
        if epsilon is not None:
            privacy.epsilon = epsilon
        if delta is not None:
            privacy.delta = delta
        privacy.release_noisy_scores = release_noisy_scores
        privacy.on_budget_exhausted = _enum_value(
            privacy_pb2.BudgetExhaustedAction, "BUDGET_EXHAUSTED_ACTION_", on_budget_exhausted
        )
    if consent is not None or consent_reference:
        request.consent.personalization = _enum_value(
            privacy_pb2.ConsentDecision, "CONSENT_DECISION_", consent
        )
        request.consent.consent_reference = consent_reference
    if explain is not None:
        request.explain.level = _enum_value(ranker_pb2.ExplainLevel, "EXPLAIN_LEVEL_", explain)
        request.explain.max_dimensions = max_dimensions
    return request


class FairrankClient:
    """A connection to one fairrank server: Ranker, Admin, health and reflection calls.

    Every call has a deadline of ``timeout`` seconds and raises :class:`FairrankError`
    when it fails. Admin calls send ``authorization: Bearer <admin_token>``. Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        admin_token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Opens an insecure (plaintext) channel to ``address`` (``HOST:PORT``)."""
        self.address = address.removeprefix("http://")
        self.admin_token = admin_token
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.ranker = ranker_pb2_grpc.RankerStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> FairrankClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Blocks until the channel connects (``grpc.FutureTimeoutError`` after ``timeout``)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout or self.timeout)

    def _call(self, method: Any, request: Any, metadata: Sequence[tuple[str, str]] = ()) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=list(metadata) or None)
        except grpc.RpcError as error:
            raise FairrankError.from_rpc_error(error) from None

    def _admin_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.admin_token}")] if self.admin_token else []

    def rank(self, request: ranker_pb2.RankRequest) -> ranker_pb2.RankResponse:
        """``Ranker.Rank``: the top k items for one user."""
        return self._call(self.ranker.Rank, request)

    def rank_batch(
        self, requests: Iterable[ranker_pb2.RankRequest]
    ) -> ranker_pb2.RankBatchResponse:
        """``Ranker.RankBatch``: many requests in one call, each answered independently."""
        return self._call(
            self.ranker.RankBatch, ranker_pb2.RankBatchRequest(requests=list(requests))
        )

    def status(self) -> admin_pb2.GetStatusResponse:
        """``Admin.GetStatus`` (needs the admin token)."""
        return self._call(
            self.admin.GetStatus, admin_pb2.GetStatusRequest(), self._admin_metadata()
        )

    def health(self, service: str = "") -> str:
        """``grpc.health.v1.Health.Check``: ``SERVING``, ``NOT_SERVING``, ... of ``service``
        (empty: the whole server)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _reflect(
        self, request: reflection_pb2.ServerReflectionRequest, version: str
    ) -> reflection_pb2.ServerReflectionResponse:
        """One request on the reflection stream of ``version`` (``v1`` or ``v1alpha``).

        grpcio-reflection ships the ``v1alpha`` messages only; ``v1`` has the same
        messages on the wire under another service name, so they serve for both.
        """
        if version not in ("v1", "v1alpha"):
            raise ValueError(f"unknown reflection version {version!r}; expected v1 or v1alpha")
        call = self.channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        try:
            responses = list(call(iter([request]), timeout=self.timeout))
        except grpc.RpcError as error:
            raise FairrankError.from_rpc_error(error) from None
        if len(responses) != 1:
            raise FairrankError(
                grpc.StatusCode.INTERNAL,
                f"reflection answered {len(responses)} messages to one request",
                "ERROR_REASON_UNSPECIFIED",
                None,
            )
        response = responses[0]
        if response.HasField("error_response"):
            raise FairrankError(
                _status_code(response.error_response.error_code),
                response.error_response.error_message,
                "ERROR_REASON_UNSPECIFIED",
                None,
            )
        return response

    def list_services(self, version: str = "v1") -> list[str]:
        """The fully qualified service names listed by server reflection, sorted."""
        response = self._reflect(reflection_pb2.ServerReflectionRequest(list_services=""), version)
        return sorted(service.name for service in response.list_services_response.service)

    def file_descriptors_for_symbol(
        self, symbol: str, version: str = "v1"
    ) -> list[descriptor_pb2.FileDescriptorProto]:
        """The ``.proto`` file defining ``symbol`` (for example ``fairrank.v1.Ranker``) and
        the files it imports, as the server's reflection service sends them."""
        response = self._reflect(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol), version
        )
        return [
            descriptor_pb2.FileDescriptorProto.FromString(serialized)
            for serialized in response.file_descriptor_response.file_descriptor_proto
        ]


def response_to_dict(message: Any) -> dict[str, Any]:
    """A response as a JSON-ready dict in the canonical proto3 JSON mapping.

    Field names are kept as in the ``.proto`` (``item_id``, not ``itemId``), enums are
    names, 64-bit integers are strings (as the mapping prescribes), and fields without
    presence are printed even at their default value (``personalized: false``).
    """
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def _groups_text(response: ranker_pb2.RankResponse, item: ranker_pb2.RankedItem) -> str:
    pairs = zip(response.group_attributes, item.group_labels, strict=False)
    return " ".join(f"{name}={label}" for name, label in pairs)


def format_table(response: ranker_pb2.RankResponse) -> str:
    """A readable rendering of a ``RankResponse``: header, items, fairness and privacy."""
    lines: list[str] = []
    if response.personalized:
        personalization = "personalized"
    else:
        reason = _enum_name(privacy_pb2.NonPersonalizedReason, response.non_personalized_reason)
        personalization = f"not personalized ({reason})"
    replayed = " (replayed)" if response.replayed else ""
    lines.append(
        f"request {response.request_id}{replayed}: {len(response.items)} items of "
        f"{response.scored_items} scored, pool {response.pool_size}, {personalization}"
    )
    lines.append(
        f"item table generation {response.items_table.generation} "
        f"(checksum {response.items_table.checksum:016x}), "
        f"scores: {_enum_name(ranker_pb2.ScoreKind, response.score_kind)}"
    )
    if response.skipped_candidate_ids:
        lines.append(f"skipped unknown candidates: {', '.join(response.skipped_candidate_ids)}")
    id_width = max([len("item"), *(len(item.item_id) for item in response.items)])
    lines.append(f"{'rank':>4}  {'item':<{id_width}}  {'score':>12}  {'before':>7}  groups")
    for item in response.items:
        score = f"{item.score:.6f}" if item.HasField("score") else "-"
        lines.append(
            f"{item.rank:>4}  {item.item_id:<{id_width}}  {score:>12}  "
            f"{item.unconstrained_rank:>7}  {_groups_text(response, item)}"
        )
        for reason in item.explanation.reasons:
            code = _enum_name(ranker_pb2.ReasonCode, reason.code)
            lines.append(f"        {code}" + (f": {reason.text}" if reason.text else ""))
        if item.explanation.contributions:
            dimensions = ", ".join(
                f"{c.name or f'dim {c.dimension}'} {c.contribution:+.4f}"
                for c in item.explanation.contributions
            )
            lines.append(f"        top dimensions: {dimensions}")
    if response.HasField("fairness"):
        fairness = response.fairness
        satisfied = "satisfied" if fairness.satisfied else "NOT satisfied"
        by = f", groups by {fairness.group_attribute}" if fairness.group_attribute else ""
        lines.append(
            f"fairness: constraint {fairness.constraint}, {satisfied}, "
            f"nDCG vs unconstrained {fairness.ndcg_vs_unconstrained:.4f}{by}"
        )
        if fairness.fallback not in (
            fairness_pb2.FAIRNESS_FALLBACK_UNSPECIFIED,
            fairness_pb2.FAIRNESS_FALLBACK_NONE,
        ):
            fallback = _enum_name(fairness_pb2.FairnessFallback, fairness.fallback)
            lines.append(f"  fallback {fallback}: {fairness.fallback_reason}")
        for group in fairness.groups:
            target = (
                f", target {100.0 * group.target_share:.1f}%"
                if group.HasField("target_share")
                else ""
            )
            lines.append(
                f"  group {group.group}: {group.items_returned} returned "
                f"({group.items_in_pool} in pool), exposure {100.0 * group.exposure_share:.1f}% "
                f"(unconstrained {100.0 * group.unconstrained_exposure_share:.1f}%){target}"
            )
        for violation in fairness.violations:
            lines.append(f"  violation: {violation.description}")
    if response.HasField("privacy"):
        privacy = response.privacy
        if privacy.dp_applied:
            mechanism = _enum_name(privacy_pb2.PrivacyMechanism, privacy.mechanism)
            remaining = (
                f", rho remaining {privacy.rho_remaining:.4g}"
                if privacy.HasField("rho_remaining")
                else ""
            )
            epsilon = (
                f" (epsilon {privacy.epsilon:.4g} at delta {privacy.delta:.2g})"
                if privacy.HasField("epsilon") and privacy.HasField("delta")
                else ""
            )
            lines.append(
                f"privacy: {mechanism}, rho charged {privacy.rho_charged:.4g}{epsilon}{remaining}"
            )
        else:
            lines.append("privacy: no differential privacy applied")
    timings = response.timings
    lines.append(
        f"server time {timings.total_us} us (queue {timings.queue_us}, "
        f"score {timings.score_us}, re-rank {timings.rerank_us}, report {timings.report_us})"
    )
    return "\n".join(lines)


def _parse_embedding(text: str) -> list[float]:
    """``--embedding``: comma- or space-separated numbers, or ``@FILE`` holding a JSON
    array or such numbers."""
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as handle:
            text = handle.read()
        stripped = text.strip()
        if stripped.startswith("["):
            values = json.loads(stripped)
            if not isinstance(values, list):
                raise ValueError("the embedding file's JSON must be an array of numbers")
            return [float(value) for value in values]
    values = [float(part) for part in text.replace(",", " ").split()]
    if not values:
        raise ValueError("the embedding is empty")
    return values


def _parse_params(text: str) -> dict[str, Any]:
    """``--params``: a JSON object of constraint parameters."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--params must be a JSON object, for example '{\"p\": 0.5}'")
    return value


def _choices(enum: Any, prefix: str) -> list[str]:
    return [
        value.name[len(prefix) :].lower().replace("_", "-")
        for value in enum.DESCRIPTOR.values
        if not value.name.endswith("_UNSPECIFIED")
    ]


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py",
        description="Python client of the fairrank gRPC API (fairrank.v1).",
    )
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--addr", default=DEFAULT_ADDRESS, help=f"server HOST:PORT (default {DEFAULT_ADDRESS})"
    )
    connection.add_argument(
        "--timeout", type=float, default=10.0, help="deadline of each call in seconds"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    rank = commands.add_parser(
        "rank", parents=[connection], help="rank items for a user (Ranker.Rank)"
    )
    user = rank.add_mutually_exclusive_group(required=True)
    user.add_argument("--user", help="user id (a row of the server's user table)")
    user.add_argument(
        "--embedding",
        type=_parse_embedding,
        help="inline user embedding: comma-separated numbers (write --embedding=-0.1,... "
        "when the first is negative), or @FILE holding a JSON array",
    )
    rank.add_argument("--subject", default="", help="privacy subject id of an inline user")
    rank.add_argument(
        "--fallback-unknown-user",
        action="store_true",
        help="rank an unknown user id by item prior instead of NOT_FOUND",
    )
    rank.add_argument(
        "--candidates",
        type=lambda text: [part for part in text.split(",") if part],
        default=[],
        help="comma-separated item ids (default: the whole catalog)",
    )
    rank.add_argument(
        "--skip-unknown-candidates",
        action="store_true",
        help="skip candidate ids the table lacks instead of NOT_FOUND",
    )
    rank.add_argument("--k", type=int, default=10, help="number of items to return")
    rank.add_argument("--pool", type=int, help="re-ranking pool size (default: the server's)")
    fairness = rank.add_argument_group("fairness policy (default: the server's)")
    fairness.add_argument("--constraint", help="constraint name, e.g. none, fa*ir, det-greedy")
    fairness.add_argument(
        "--params", type=_parse_params, help="constraint parameters as JSON, e.g. '{\"p\": 0.5}'"
    )
    fairness.add_argument("--group-attribute", help="item group attribute (provider_group)")
    fairness.add_argument("--exposure-scope", help="amortized exposure scope (fairco, ...)")
    fairness.add_argument(
        "--on-infeasible",
        choices=_choices(fairness_pb2.InfeasibleAction, "INFEASIBLE_ACTION_"),
    )
    privacy = rank.add_argument_group("privacy policy (default: the server's)")
    privacy.add_argument(
        "--privacy", choices=_choices(privacy_pb2.PrivacyMechanism, "PRIVACY_MECHANISM_")
    )
    budget = privacy.add_mutually_exclusive_group()
    budget.add_argument("--rho", type=float, help="per-request budget as zCDP rho")
    budget.add_argument("--epsilon", type=float, help="per-request budget as pure epsilon")
    privacy.add_argument("--delta", type=float, help="delta of the reported (epsilon, delta)")
    privacy.add_argument(
        "--noisy-scores", action="store_true", help="also release noisy scores under DP"
    )
    privacy.add_argument(
        "--on-budget-exhausted",
        choices=_choices(privacy_pb2.BudgetExhaustedAction, "BUDGET_EXHAUSTED_ACTION_"),
    )
    privacy.add_argument(
        "--consent",
        choices=_choices(privacy_pb2.ConsentDecision, "CONSENT_DECISION_"),
        help="the user's personalization consent",
    )
    rank.add_argument("--explain", choices=_choices(ranker_pb2.ExplainLevel, "EXPLAIN_LEVEL_"))
    rank.add_argument("--request-id", help="idempotency key (default: a fresh UUID)")
    rank.add_argument("--format", choices=["table", "json"], default="table")

    commands.add_parser(
        "health", parents=[connection], help="the server's health status (grpc.health.v1)"
    )
    commands.add_parser(
        "services", parents=[connection], help="services listed by server reflection"
    )
    status = commands.add_parser(
        "status", parents=[connection], help="Admin.GetStatus (needs the admin token)"
    )
    status.add_argument(
        "--admin-token",
        default=os.environ.get(ADMIN_TOKEN_ENV),
        help=f"bearer token (default: ${ADMIN_TOKEN_ENV})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the process exit status (0 ok, 1 refused, 2 usage)."""
    args = _argument_parser().parse_args(argv)
    admin_token = getattr(args, "admin_token", None)
    try:
        with FairrankClient(args.addr, admin_token=admin_token, timeout=args.timeout) as client:
            if args.command == "rank":
                request = build_rank_request(
                    user_id=args.user,
                    embedding=args.embedding,
                    subject_id=args.subject,
                    fallback_for_unknown_user=args.fallback_unknown_user,
                    candidates=args.candidates,
                    skip_unknown_candidates=args.skip_unknown_candidates,
                    k=args.k,
                    pool_size=args.pool,
                    constraint=args.constraint,
                    params=args.params,
                    group_attribute=args.group_attribute,
                    exposure_scope=args.exposure_scope,
                    on_infeasible=args.on_infeasible,
                    privacy_mechanism=args.privacy,
                    rho=args.rho,
                    epsilon=args.epsilon,
                    delta=args.delta,
                    release_noisy_scores=args.noisy_scores,
                    on_budget_exhausted=args.on_budget_exhausted,
                    consent=args.consent,
                    explain=args.explain,
                    request_id=args.request_id,
                )
                response = client.rank(request)
                if args.format == "json":
                    print(json.dumps(response_to_dict(response), indent=2))
                else:
                    print(format_table(response))
            elif args.command == "health":
                print(client.health())
            elif args.command == "services":
                print("\n".join(client.list_services()))
            elif args.command == "status":
                print(json.dumps(response_to_dict(client.status()), indent=2))
    except FairrankError as error:
        print(f"error: the call failed: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
