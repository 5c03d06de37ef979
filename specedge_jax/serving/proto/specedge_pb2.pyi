from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("prompt_text", "prompt_token_ids", "sampling", "seed", "max_new_tokens", "client_id", "request_id", "itl_slo_ms", "resume_tokens", "resume_rounds", "first_tree", "tokenizer")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITL_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUME_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TREE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    seed: int
    max_new_tokens: int
    client_id: str
    request_id: str
    itl_slo_ms: int
    resume_tokens: _containers.RepeatedScalarFieldContainer[int]
    resume_rounds: int
    first_tree: FirstTree
    tokenizer: TokenizerFingerprint
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., client_id: _Optional[str] = ..., request_id: _Optional[str] = ..., itl_slo_ms: _Optional[int] = ..., resume_tokens: _Optional[_Iterable[int]] = ..., resume_rounds: _Optional[int] = ..., first_tree: _Optional[_Union[FirstTree, _Mapping]] = ..., tokenizer: _Optional[_Union[TokenizerFingerprint, _Mapping]] = ...) -> None: ...

class TokenizerFingerprint(_message.Message):
    __slots__ = ("vocab_size", "special_tokens", "vocab_sha256", "range_digests")
    class SpecialTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SHA256_FIELD_NUMBER: _ClassVar[int]
    RANGE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    special_tokens: _containers.ScalarMap[str, int]
    vocab_sha256: str
    range_digests: bytes
    def __init__(self, vocab_size: _Optional[int] = ..., special_tokens: _Optional[_Mapping[str, int]] = ..., vocab_sha256: _Optional[str] = ..., range_digests: _Optional[bytes] = ...) -> None: ...

class FirstTree(_message.Message):
    __slots__ = ("tokens", "parents")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("queue_time_s", "forward_time_s", "batch_size")
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TIME_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_time_s: float
    forward_time_s: float
    batch_size: int
    def __init__(self, queue_time_s: _Optional[float] = ..., forward_time_s: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "first_token", "finished", "prompt_tokens", "prompt_token_ids", "finish_reason", "timing", "first_round")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    first_token: int
    finished: bool
    prompt_tokens: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    timing: ServerTiming
    first_round: VerifyResponse
    def __init__(self, session_id: _Optional[str] = ..., first_token: _Optional[int] = ..., finished: _Optional[bool] = ..., prompt_tokens: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., first_round: _Optional[_Union[VerifyResponse, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("session_id", "root_token", "tokens", "parents", "step", "edge_rtt_s", "edge_draft_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EDGE_RTT_S_FIELD_NUMBER: _ClassVar[int]
    EDGE_DRAFT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    root_token: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    step: int
    edge_rtt_s: float
    edge_draft_s: float
    def __init__(self, session_id: _Optional[str] = ..., root_token: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., step: _Optional[int] = ..., edge_rtt_s: _Optional[float] = ..., edge_draft_s: _Optional[float] = ...) -> None: ...

class TreeAdvice(_message.Message):
    __slots__ = ("budget", "depth")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    budget: int
    depth: int
    def __init__(self, budget: _Optional[int] = ..., depth: _Optional[int] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("accepted_tokens", "bonus_token", "emitted_tokens", "finished", "finish_reason", "timing", "next_tree")
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BONUS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    NEXT_TREE_FIELD_NUMBER: _ClassVar[int]
    accepted_tokens: _containers.RepeatedScalarFieldContainer[int]
    bonus_token: int
    emitted_tokens: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    timing: ServerTiming
    next_tree: TreeAdvice
    def __init__(self, accepted_tokens: _Optional[_Iterable[int]] = ..., bonus_token: _Optional[int] = ..., emitted_tokens: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., next_tree: _Optional[_Union[TreeAdvice, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("generated_tokens",)
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    generated_tokens: int
    def __init__(self, generated_tokens: _Optional[int] = ...) -> None: ...
