from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("protocol_version", "target_model", "tokenizer_fingerprint", "vocab_size", "context_limit", "max_draft_tokens", "max_sessions", "active_sessions", "eos_token_ids", "kv_bytes_in_use", "kv_bytes_reserved", "kv_budget_bytes", "kv_pool_bytes", "max_ahead_rounds")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_IN_USE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RESERVED_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_AHEAD_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    target_model: str
    tokenizer_fingerprint: str
    vocab_size: int
    context_limit: int
    max_draft_tokens: int
    max_sessions: int
    active_sessions: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    kv_bytes_in_use: int
    kv_bytes_reserved: int
    kv_budget_bytes: int
    kv_pool_bytes: int
    max_ahead_rounds: int
    def __init__(self, protocol_version: _Optional[int] = ..., target_model: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., context_limit: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ..., max_sessions: _Optional[int] = ..., active_sessions: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., kv_bytes_in_use: _Optional[int] = ..., kv_bytes_reserved: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., kv_pool_bytes: _Optional[int] = ..., max_ahead_rounds: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("protocol_version", "tokenizer_fingerprint", "drafter_model", "prefix_ids", "sampling", "max_new_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_MODEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    tokenizer_fingerprint: str
    drafter_model: str
    prefix_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    max_new_tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., drafter_model: _Optional[str] = ..., prefix_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class SparseDist(_message.Message):
    __slots__ = ("ids", "probs_f16")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_F16_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs_f16: bytes
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs_f16: _Optional[bytes] = ...) -> None: ...

class DraftBlock(_message.Message):
    __slots__ = ("round", "ids", "q", "parent_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    PARENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDist]
    parent_round: int
    def __init__(self, round: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., parent_round: _Optional[int] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Generate(_message.Message):
    __slots__ = ("round", "max_tokens", "tokens_per_message")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    round: int
    max_tokens: int
    tokens_per_message: int
    def __init__(self, round: _Optional[int] = ..., max_tokens: _Optional[int] = ..., tokens_per_message: _Optional[int] = ...) -> None: ...

class DeviceMessage(_message.Message):
    __slots__ = ("open", "draft", "close", "generate")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    draft: DraftBlock
    close: CloseSession
    generate: Generate
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., draft: _Optional[_Union[DraftBlock, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ..., generate: _Optional[_Union[Generate, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "target_model", "context_limit", "max_draft_tokens", "max_ahead_rounds", "empty_ahead", "eos_token_ids", "eos_listed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_AHEAD_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EMPTY_AHEAD_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_LISTED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target_model: str
    context_limit: int
    max_draft_tokens: int
    max_ahead_rounds: int
    empty_ahead: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_listed: bool
    def __init__(self, session_id: _Optional[str] = ..., target_model: _Optional[str] = ..., context_limit: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ..., max_ahead_rounds: _Optional[int] = ..., empty_ahead: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., eos_listed: _Optional[bool] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("round", "n_accepted", "next_token", "queue_ms", "compute_ms", "batch_rows", "stale", "more_tokens")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    N_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    MORE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    round: int
    n_accepted: int
    next_token: int
    queue_ms: float
    compute_ms: float
    batch_rows: int
    stale: bool
    more_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., n_accepted: _Optional[int] = ..., next_token: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_rows: _Optional[int] = ..., stale: _Optional[bool] = ..., more_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("opened", "verdict")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    verdict: Verdict
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...
