from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HiddenDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HIDDEN_DTYPE_UNSPECIFIED: _ClassVar[HiddenDtype]
    HIDDEN_DTYPE_BF16: _ClassVar[HiddenDtype]
    HIDDEN_DTYPE_FP16: _ClassVar[HiddenDtype]
    HIDDEN_DTYPE_FP32: _ClassVar[HiddenDtype]
HIDDEN_DTYPE_UNSPECIFIED: HiddenDtype
HIDDEN_DTYPE_BF16: HiddenDtype
HIDDEN_DTYPE_FP16: HiddenDtype
HIDDEN_DTYPE_FP32: HiddenDtype

class HiddenStates(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: HiddenDtype
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[HiddenDtype, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("prompt_tokens", "sampling", "seed", "max_new_tokens", "client_id", "request_id")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    sampling: SamplingParams
    seed: int
    max_new_tokens: int
    client_id: str
    request_id: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., client_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class OpenChunk(_message.Message):
    __slots__ = ("request", "hidden")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    request: OpenRequest
    hidden: HiddenStates
    def __init__(self, request: _Optional[_Union[OpenRequest, _Mapping]] = ..., hidden: _Optional[_Union[HiddenStates, _Mapping]] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("queue_time_s", "forward_time_s", "batch_size")
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TIME_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_time_s: float
    forward_time_s: float
    batch_size: int
    def __init__(self, queue_time_s: _Optional[float] = ..., forward_time_s: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class OpenResponse(_message.Message):
    __slots__ = ("session_id", "first_token", "finished", "finish_reason", "timing")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    first_token: int
    finished: bool
    finish_reason: str
    timing: ServerTiming
    def __init__(self, session_id: _Optional[str] = ..., first_token: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "step", "hidden")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    hidden: HiddenStates
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[HiddenStates, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("token", "finished", "finish_reason", "timing")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    token: int
    finished: bool
    finish_reason: str
    timing: ServerTiming
    def __init__(self, token: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseResponse(_message.Message):
    __slots__ = ("generated_tokens",)
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    generated_tokens: int
    def __init__(self, generated_tokens: _Optional[int] = ...) -> None: ...
