from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Todo(_message.Message):
    __slots__ = ("id", "text", "done")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    done: bool
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ...) -> None: ...

class CreateTodoRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ListTodosRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTodosResponse(_message.Message):
    __slots__ = ("todos",)
    TODOS_FIELD_NUMBER: _ClassVar[int]
    todos: _containers.RepeatedCompositeFieldContainer[Todo]
    def __init__(self, todos: _Optional[_Iterable[_Union[Todo, _Mapping]]] = ...) -> None: ...

class UpdateTodoRequest(_message.Message):
    __slots__ = ("id", "text", "done")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    done: bool
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ...) -> None: ...

class DeleteTodoRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteTodoResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamTodosRequest(_message.Message):
    __slots__ = ("repeat", "interval_ms")
    REPEAT_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    repeat: int
    interval_ms: int
    def __init__(self, repeat: _Optional[int] = ..., interval_ms: _Optional[int] = ...) -> None: ...

class BulkCreateTodosResponse(_message.Message):
    __slots__ = ("created_count",)
    CREATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    created_count: int
    def __init__(self, created_count: _Optional[int] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("create", "update", "delete")
    CREATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    create: CreateTodoRequest
    update: UpdateTodoRequest
    delete: DeleteTodoRequest
    def __init__(self, create: _Optional[_Union[CreateTodoRequest, _Mapping]] = ..., update: _Optional[_Union[UpdateTodoRequest, _Mapping]] = ..., delete: _Optional[_Union[DeleteTodoRequest, _Mapping]] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("todo", "error", "deleted_id")
    TODO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DELETED_ID_FIELD_NUMBER: _ClassVar[int]
    todo: Todo
    error: str
    deleted_id: str
    def __init__(self, todo: _Optional[_Union[Todo, _Mapping]] = ..., error: _Optional[str] = ..., deleted_id: _Optional[str] = ...) -> None: ...
