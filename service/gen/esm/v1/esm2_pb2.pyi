from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]

class OutputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_KIND_UNSPECIFIED: _ClassVar[OutputKind]
    OUTPUT_KIND_MEAN: _ClassVar[OutputKind]
    OUTPUT_KIND_BOS: _ClassVar[OutputKind]
    OUTPUT_KIND_PER_TOKEN: _ClassVar[OutputKind]
    OUTPUT_KIND_CONTACTS: _ClassVar[OutputKind]
    OUTPUT_KIND_ATTENTIONS: _ClassVar[OutputKind]
    OUTPUT_KIND_LOGITS: _ClassVar[OutputKind]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
OUTPUT_KIND_UNSPECIFIED: OutputKind
OUTPUT_KIND_MEAN: OutputKind
OUTPUT_KIND_BOS: OutputKind
OUTPUT_KIND_PER_TOKEN: OutputKind
OUTPUT_KIND_CONTACTS: OutputKind
OUTPUT_KIND_ATTENTIONS: OutputKind
OUTPUT_KIND_LOGITS: OutputKind

class SequenceItem(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: str
    def __init__(self, sequence: _Optional[str] = ...) -> None: ...

class EncodeParams(_message.Message):
    __slots__ = ("repr_layers", "include")
    REPR_LAYERS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    repr_layers: _containers.RepeatedScalarFieldContainer[int]
    include: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, repr_layers: _Optional[_Iterable[int]] = ..., include: _Optional[_Iterable[str]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "params", "items")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    params: EncodeParams
    items: _containers.RepeatedCompositeFieldContainer[SequenceItem]
    def __init__(self, model: _Optional[str] = ..., params: _Optional[_Union[EncodeParams, _Mapping]] = ..., items: _Optional[_Iterable[_Union[SequenceItem, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeResult, _Mapping]]] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "values")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerEmbedding(_message.Message):
    __slots__ = ("layer", "embedding")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerPerTokenEmbeddings(_message.Message):
    __slots__ = ("layer", "embeddings")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    embeddings: Matrix
    def __init__(self, layer: _Optional[int] = ..., embeddings: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("sequence_index", "embeddings", "bos_embeddings", "per_token_embeddings", "contacts", "attentions", "logits", "vocab_tokens")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    BOS_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    CONTACTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTIONS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    embeddings: _containers.RepeatedCompositeFieldContainer[LayerEmbedding]
    bos_embeddings: _containers.RepeatedCompositeFieldContainer[LayerEmbedding]
    per_token_embeddings: _containers.RepeatedCompositeFieldContainer[LayerPerTokenEmbeddings]
    contacts: Matrix
    attentions: Matrix
    logits: Matrix
    vocab_tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequence_index: _Optional[int] = ..., embeddings: _Optional[_Iterable[_Union[LayerEmbedding, _Mapping]]] = ..., bos_embeddings: _Optional[_Iterable[_Union[LayerEmbedding, _Mapping]]] = ..., per_token_embeddings: _Optional[_Iterable[_Union[LayerPerTokenEmbeddings, _Mapping]]] = ..., contacts: _Optional[_Union[Matrix, _Mapping]] = ..., attentions: _Optional[_Union[Matrix, _Mapping]] = ..., logits: _Optional[_Union[Matrix, _Mapping]] = ..., vocab_tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "items")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[SequenceItem]
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[SequenceItem, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PredictResult, _Mapping]]] = ...) -> None: ...

class PredictResult(_message.Message):
    __slots__ = ("sequence_index", "logits", "sequence_tokens", "vocab_tokens")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    logits: Matrix
    sequence_tokens: _containers.RepeatedScalarFieldContainer[str]
    vocab_tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequence_index: _Optional[int] = ..., logits: _Optional[_Union[Matrix, _Mapping]] = ..., sequence_tokens: _Optional[_Iterable[str]] = ..., vocab_tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class StreamOptions(_message.Message):
    __slots__ = ("data_type", "max_chunk_bytes")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    data_type: DataType
    max_chunk_bytes: int
    def __init__(self, data_type: _Optional[_Union[DataType, str]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class EncodeStreamRequest(_message.Message):
    __slots__ = ("model", "params", "items", "stream_options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    params: EncodeParams
    items: _containers.RepeatedCompositeFieldContainer[SequenceItem]
    stream_options: StreamOptions
    def __init__(self, model: _Optional[str] = ..., params: _Optional[_Union[EncodeParams, _Mapping]] = ..., items: _Optional[_Iterable[_Union[SequenceItem, _Mapping]]] = ..., stream_options: _Optional[_Union[StreamOptions, _Mapping]] = ...) -> None: ...

class ItemHeader(_message.Message):
    __slots__ = ("sequence_index", "sequence_length", "vocab_tokens", "sequence_tokens")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    sequence_length: int
    vocab_tokens: _containers.RepeatedScalarFieldContainer[str]
    sequence_tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequence_index: _Optional[int] = ..., sequence_length: _Optional[int] = ..., vocab_tokens: _Optional[_Iterable[str]] = ..., sequence_tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("sequence_index", "output", "layer", "shape", "row_start", "row_count", "data_type", "data")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    output: OutputKind
    layer: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    row_start: int
    row_count: int
    data_type: DataType
    data: bytes
    def __init__(self, sequence_index: _Optional[int] = ..., output: _Optional[_Union[OutputKind, str]] = ..., layer: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., row_start: _Optional[int] = ..., row_count: _Optional[int] = ..., data_type: _Optional[_Union[DataType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodeStreamResponse(_message.Message):
    __slots__ = ("item_header", "chunk")
    ITEM_HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    item_header: ItemHeader
    chunk: TensorChunk
    def __init__(self, item_header: _Optional[_Union[ItemHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class PredictStreamRequest(_message.Message):
    __slots__ = ("model", "items", "stream_options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[SequenceItem]
    stream_options: StreamOptions
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[SequenceItem, _Mapping]]] = ..., stream_options: _Optional[_Union[StreamOptions, _Mapping]] = ...) -> None: ...

class PredictStreamResponse(_message.Message):
    __slots__ = ("item_header", "chunk")
    ITEM_HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    item_header: ItemHeader
    chunk: TensorChunk
    def __init__(self, item_header: _Optional[_Union[ItemHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class EncodeJsonRequest(_message.Message):
    __slots__ = ("model", "params", "items")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    params: EncodeParams
    items: _containers.RepeatedCompositeFieldContainer[SequenceItem]
    def __init__(self, model: _Optional[str] = ..., params: _Optional[_Union[EncodeParams, _Mapping]] = ..., items: _Optional[_Iterable[_Union[SequenceItem, _Mapping]]] = ...) -> None: ...

class PredictJsonRequest(_message.Message):
    __slots__ = ("model", "params", "items")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    params: EncodeParams
    items: _containers.RepeatedCompositeFieldContainer[SequenceItem]
    def __init__(self, model: _Optional[str] = ..., params: _Optional[_Union[EncodeParams, _Mapping]] = ..., items: _Optional[_Iterable[_Union[SequenceItem, _Mapping]]] = ...) -> None: ...

class GetRequestSchemaRequest(_message.Message):
    __slots__ = ("model", "action")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    action: str
    def __init__(self, model: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "checkpoint", "num_layers", "embed_dim", "attention_heads", "parameters", "random_weights", "ready", "max_items", "max_sequence_length", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: str
    num_layers: int
    embed_dim: int
    attention_heads: int
    parameters: int
    random_weights: bool
    ready: bool
    max_items: int
    max_sequence_length: int
    device: str
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ..., num_layers: _Optional[int] = ..., embed_dim: _Optional[int] = ..., attention_heads: _Optional[int] = ..., parameters: _Optional[int] = ..., random_weights: _Optional[bool] = ..., ready: _Optional[bool] = ..., max_items: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...
