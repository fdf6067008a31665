"""Request and response shapes of the HTTP API (they are also its OpenAPI schema).

Why: every field a client may send is declared with its limits, so bad input is refused
with a 4xx that names the field, never a 500, and the served schema is exact enough for
schemathesis to explore.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    field_validator,
    model_validator,
)

from gembatch.inputs import KNOWN_REQUEST_FIELDS, SplitLimits
from gembatch.jobs import DEFAULT_RETRY_ON, ErrorClass
from gembatch.server.webhook_targets import url_problem

PublicStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
MAX_TASK_BYTES = SplitLimits().max_bytes  # below Gemini's 2 GB input file limit
MAX_TASKS_PER_JOB = 1000  # a job split finer than this is refused (422)


class RetryConfigModel(BaseModel):
    """Seed 004's retry rules (`max_attempts`, `retry_interval`, `retry_on_errors`)."""

    model_config = ConfigDict(extra="forbid")
    max_attempts: int = Field(3, ge=1, le=100)
    retry_interval: float = Field(30.0, ge=0, le=86400)
    retry_on_errors: list[ErrorClass] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    backoff_factor: float = Field(2.0, ge=1, le=10)
    max_interval: float = Field(1800.0, ge=0, le=7 * 86400)
    jitter: float = Field(0.2, ge=0, le=1)
    retry_failed_requests: bool = False


class ResourceLimits(BaseModel):
    """Seed 004's resource limits. `max_memory` and `max_cpu` are accepted but have no
    meaning for work done on Google's side; the limits that apply are in Gemini's units."""

    model_config = ConfigDict(extra="forbid")
    max_memory: float | None = Field(None, ge=0)
    max_cpu: float | None = Field(None, ge=0)
    max_requests_in_flight: int | None = Field(None, ge=1)
    max_tokens_in_flight: int | None = Field(None, ge=1)


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(
        None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
    )
    display_name: str | None = Field(None, max_length=512)
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)
    max_parallel_tasks: int | None = Field(None, ge=1, le=100)
    # Split the input into several tasks (remote batches), as `gembatch submit
    # --max-task-requests/--max-task-bytes` does: what makes `max_parallel_tasks` and
    # `resource_limits` matter below Gemini's 2 GB file limit.
    max_task_requests: int | None = Field(None, ge=1, le=100_000_000)
    max_task_bytes: int | None = Field(None, ge=1, le=MAX_TASK_BYTES)
    retry_config: RetryConfigModel | None = None
    resource_limits: ResourceLimits | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    notify_url: str | None = Field(None, max_length=2048, pattern=r"^https?://[^\s]+$")

    @field_validator("notify_url")
    @classmethod
    def _notify_url_parses(cls, value: str | None) -> str | None:
        # The pattern lets `http://[::1` through; where it points is checked by the
        # service (it resolves the name).
        if value is not None and (problem := url_problem(value)) is not None:
            raise ValueError(f"notify_url {problem}")
        return value


def _request_schema() -> dict[str, Any]:
    """The JSON schema of one GenerateContentRequest as the service checks it
    (`inputs.check_request`): `contents` a non-empty array, only the known top-level fields.
    Only in the OpenAPI schema: validation is the file checker's, the same as the CLI's."""
    part = {"type": "object", "properties": {"text": {"type": "string"}}}
    content = {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["user", "model"]},
            "parts": {"type": "array", "minItems": 1, "items": part},
        },
        "required": ["parts"],
    }
    kinds: dict[str, dict[str, Any]] = {
        "contents": {"type": "array", "minItems": 1, "items": content},
        "model": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "object"}},
        "safetySettings": {"type": "array", "items": {"type": "object"}},
        "cachedContent": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    }
    properties = {}
    for name in sorted(KNOWN_REQUEST_FIELDS):
        camel = re.sub(r"_([a-z])", lambda m: m[1].upper(), name)
        properties[name] = kinds.get(camel, {"type": "object"})
    return {
        "type": "object",
        "description": "A GenerateContentRequest: `contents`, and optionally "
        "`generationConfig`, `systemInstruction`, `tools`, ... (camelCase or snake_case)",
        "properties": properties,
        "required": ["contents"],
        "additionalProperties": False,
    }


class BatchRequestItem(BaseModel):
    """One request: `{"key": ..., "request": GenerateContentRequest}` (the batch file's
    line format). Without a key, `request-<n>` is used."""

    model_config = ConfigDict(extra="forbid")
    key: str | None = Field(None, min_length=1, max_length=512)
    request: dict[str, Any] = Field(json_schema_extra=_request_schema())


CREATE_EXAMPLE = {
    "requests": [
        {"key": "q1", "request": {"contents": [{"parts": [{"text": "What is a batch job?"}]}]}},
        {"key": "q2", "request": {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}},
    ],
    "display_name": "two questions",
    "priority": 1,
    "max_task_requests": 1,
    "max_parallel_tasks": 1,
}


def _create_schema_extra(schema: dict[str, Any]) -> None:
    """What the validator below enforces, said in the schema: exactly one of `requests`
    (an array) and `input_file` (a string); and an example."""
    schema["oneOf"] = [
        {
            "required": ["requests"],
            "properties": {"requests": {"type": "array"}, "input_file": {"type": "null"}},
        },
        {
            "required": ["input_file"],
            "properties": {"input_file": {"type": "string"}, "requests": {"type": "null"}},
        },
    ]
    schema["examples"] = [CREATE_EXAMPLE]


class CreateJobBody(JobOptions):
    """Create a job from inline requests, or from a file in the service's data directory."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_create_schema_extra)

    requests: list[BatchRequestItem] | None = Field(None, min_length=1, max_length=1_000_000)
    input_file: str | None = Field(None, min_length=1, max_length=4096)
    product_id: str | None = Field(None, max_length=512)  # seed 004: kept in metadata
    sending_group_id: str | None = Field(None, max_length=512)  # seed 004: kept in metadata

    @model_validator(mode="after")
    def _one_source(self) -> CreateJobBody:
        if (self.requests is None) == (self.input_file is None):
            raise ValueError("give exactly one of `requests` (a list) or `input_file` (a path)")
        return self

    @field_validator("input_file")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("input_file must not contain NUL characters")
        return value


class CreateJobResponse(BaseModel):
    job_id: str
    status: PublicStatus
    message: str
    warnings: list[str] = Field(default_factory=list)


class DetailedStatus(BaseModel):
    current_phase: str | None
    progress_percentage: float
    active_tasks: int
    error_count: int
    create_outcome_unknown: int = Field(
        0,
        description="Tasks whose create got no clear answer: no new batch is created for "
        "them until a complete listing of remote batches says whether theirs exists.",
    )
    remote_cleanup_pending: int = Field(
        0,
        description="Remote files and batches of the job whose delete failed; retried "
        "with backoff until done.",
    )


class RequestCountsModel(BaseModel):
    total: int
    succeeded: int
    failed: int
    pending: int


class JobStatusModel(BaseModel):
    """Seed 003's JobStatus, plus `priority`, `attempts`, seed 004's `detailed_status`,
    and gembatch's own fields."""

    job_id: str
    job_type: str
    status: PublicStatus
    progress: float
    current_step: str | None
    message: str
    result: dict[str, Any] | None
    error: str | None
    created_at: str | None
    updated_at: str | None
    priority: int
    attempts: int
    detailed_status: DetailedStatus
    error_details: dict[str, Any] | None
    requests: RequestCountsModel
    display_name: str | None
    model: str | None
    metadata: dict[str, Any]
    completed_at: str | None
    final_state: str | None
    duration_seconds: int | None


class JobListModel(BaseModel):
    jobs: list[JobStatusModel]
    count: int


class DeleteResponse(BaseModel):
    job_id: str
    status: str
    message: str


class CleanupResponse(BaseModel):
    deleted: list[str]
    count: int


class EventModel(BaseModel):
    seq: int
    type: str
    data: dict[str, Any]
    created_at: str | None


class AuditLogModel(BaseModel):
    job_id: str
    events: list[EventModel]
    audit: list[dict[str, Any]]


class UpdateBatchJobData(BaseModel):
    """Seed 004's updateBatchJob: gembatch lets an operator change the priority and move a
    job through the transitions open to users (cancel: `cancelled`; retry: `pending`).
    `detailed_status` and `error_details` are computed by gembatch and refused."""

    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=64)
    status: PublicStatus | None = None
    priority: int | None = Field(None, ge=-1_000_000, le=1_000_000)
    detailed_status: dict[str, Any] | None = None
    error_details: dict[str, Any] | None = None


class DeleteJobData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=64)
    force: bool = False


class JobOperation(BaseModel):
    """Seed 004's `/job-operations` envelope."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["createJob", "updateBatchJob", "deleteJob"]
    # The schema says which shapes `data` takes; the route validates it for its `action`
    # (so its errors name `body.data.<field>`), hence no validation here.
    data: Annotated[CreateJobBody | UpdateBatchJobData | DeleteJobData, SkipValidation] = Field(
        description="createJob: a CreateJobBody; updateBatchJob: UpdateBatchJobData; "
        "deleteJob: DeleteJobData"
    )


class HealthModel(BaseModel):
    status: str
    version: str
    database: str
    worker: dict[str, Any]
    events: dict[str, Any] = {}
