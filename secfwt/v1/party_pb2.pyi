from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_MODEL_OWNER: _ClassVar[Role]
    ROLE_DATA_OWNER: _ClassVar[Role]
    ROLE_DEALER: _ClassVar[Role]
    ROLE_OPERATOR: _ClassVar[Role]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PROPOSED: _ClassVar[JobState]
    JOB_STATE_ACCEPTED: _ClassVar[JobState]
    JOB_STATE_REFUSED: _ClassVar[JobState]
    JOB_STATE_STARTED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_FINISHED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_WITHHELD: _ClassVar[JobState]
ROLE_UNSPECIFIED: Role
ROLE_MODEL_OWNER: Role
ROLE_DATA_OWNER: Role
ROLE_DEALER: Role
ROLE_OPERATOR: Role
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PROPOSED: JobState
JOB_STATE_ACCEPTED: JobState
JOB_STATE_REFUSED: JobState
JOB_STATE_STARTED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_FINISHED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_WITHHELD: JobState

class Identity(_message.Message):
    __slots__ = ("role", "party_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    role: Role
    party_id: str
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., party_id: _Optional[str] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("protocol_version", "identity", "software_version", "capabilities")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    identity: Identity
    software_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ..., software_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("protocol_version", "identity", "software_version", "capabilities")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    identity: Identity
    software_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ..., software_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelCommitment(_message.Message):
    __slots__ = ("model_type", "dimensions", "weights_sha256")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    dimensions: _containers.ScalarMap[str, int]
    weights_sha256: str
    def __init__(self, model_type: _Optional[str] = ..., dimensions: _Optional[_Mapping[str, int]] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class DataCommitment(_message.Message):
    __slots__ = ("rows", "num_classes", "input_shape")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    rows: int
    num_classes: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rows: _Optional[int] = ..., num_classes: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Commitments(_message.Message):
    __slots__ = ("model", "data")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    model: ModelCommitment
    data: DataCommitment
    def __init__(self, model: _Optional[_Union[ModelCommitment, _Mapping]] = ..., data: _Optional[_Union[DataCommitment, _Mapping]] = ...) -> None: ...

class GetCommitmentRequest(_message.Message):
    __slots__ = ("job_toml",)
    JOB_TOML_FIELD_NUMBER: _ClassVar[int]
    job_toml: str
    def __init__(self, job_toml: _Optional[str] = ...) -> None: ...

class GetCommitmentResponse(_message.Message):
    __slots__ = ("commitments",)
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    commitments: Commitments
    def __init__(self, commitments: _Optional[_Union[Commitments, _Mapping]] = ...) -> None: ...

class DisclosureTerm(_message.Message):
    __slots__ = ("value", "to")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    value: str
    to: _containers.RepeatedScalarFieldContainer[Role]
    def __init__(self, value: _Optional[str] = ..., to: _Optional[_Iterable[_Union[Role, str]]] = ...) -> None: ...

class JobProposal(_message.Message):
    __slots__ = ("job_id", "protocol_version", "job_toml", "terms", "terms_digest", "commitments", "participants")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_TOML_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    TERMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    protocol_version: int
    job_toml: str
    terms: _containers.RepeatedCompositeFieldContainer[DisclosureTerm]
    terms_digest: str
    commitments: Commitments
    participants: _containers.RepeatedCompositeFieldContainer[Identity]
    def __init__(self, job_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., job_toml: _Optional[str] = ..., terms: _Optional[_Iterable[_Union[DisclosureTerm, _Mapping]]] = ..., terms_digest: _Optional[str] = ..., commitments: _Optional[_Union[Commitments, _Mapping]] = ..., participants: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("proposal",)
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    proposal: JobProposal
    def __init__(self, proposal: _Optional[_Union[JobProposal, _Mapping]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class AcceptRequest(_message.Message):
    __slots__ = ("job_id", "terms_digest", "proposal_digest")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TERMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    terms_digest: str
    proposal_digest: str
    def __init__(self, job_id: _Optional[str] = ..., terms_digest: _Optional[str] = ..., proposal_digest: _Optional[str] = ...) -> None: ...

class AcceptResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class RefuseRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RefuseResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("seq", "time_unix", "state", "phase", "step", "total_steps", "metrics", "message")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix: float
    state: JobState
    phase: str
    step: int
    total_steps: int
    metrics: _containers.ScalarMap[str, float]
    message: str
    def __init__(self, seq: _Optional[int] = ..., time_unix: _Optional[float] = ..., state: _Optional[_Union[JobState, str]] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., message: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "state", "party", "terms_digest", "proposal_digest", "accepted_terms_digest", "accepted_proposal_digest", "reason", "artifacts", "last_progress", "created_unix", "updated_unix", "attempts", "cancelled_by")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    TERMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TERMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PROPOSAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_BY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    party: Identity
    terms_digest: str
    proposal_digest: str
    accepted_terms_digest: str
    accepted_proposal_digest: str
    reason: str
    artifacts: _containers.RepeatedScalarFieldContainer[str]
    last_progress: ProgressEvent
    created_unix: float
    updated_unix: float
    attempts: int
    cancelled_by: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., party: _Optional[_Union[Identity, _Mapping]] = ..., terms_digest: _Optional[str] = ..., proposal_digest: _Optional[str] = ..., accepted_terms_digest: _Optional[str] = ..., accepted_proposal_digest: _Optional[str] = ..., reason: _Optional[str] = ..., artifacts: _Optional[_Iterable[str]] = ..., last_progress: _Optional[_Union[ProgressEvent, _Mapping]] = ..., created_unix: _Optional[float] = ..., updated_unix: _Optional[float] = ..., attempts: _Optional[int] = ..., cancelled_by: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class WatchProgressRequest(_message.Message):
    __slots__ = ("job_id", "after_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class FetchArtifactsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("name", "offset", "data", "size", "last", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    size: int
    last: bool
    sha256: str
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., last: _Optional[bool] = ..., sha256: _Optional[str] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("job_id", "freed_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    freed_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., freed_bytes: _Optional[int] = ...) -> None: ...
