"""Thread-safe, sqlite3-backed storage for the Todo example service.

Besides plain CRUD the store offers a change feed: a callable given to
:meth:`TodoStore.subscribe` receives ``SyncResponse(todo=...)`` after every create/update and
``SyncResponse(deleted_id=...)`` after every delete, in the order the changes were committed.

The rules both services share live here, once: the refusals (:class:`Refusal`, which names
the gRPC status and message), ``StreamTodos``' pacing (:meth:`TodoStore.paced`) and the
``SyncTodos`` actions (:meth:`TodoStore.apply_sync`). Todo text is checked here for every
write path (``CreateTodo``, ``UpdateTodo``, ``BulkCreateTodos`` and the ``SyncTodos``
actions): :func:`text_error` is the rule, :class:`InvalidTextError` the refusal.
Empty or whitespace-only text is always refused; text longer than the store's
``max_text_length`` (the demos use :data:`MAX_TEXT_LENGTH`, 500) too. A store made without
a limit takes texts of any size: the tests use the service for 16 MiB messages.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator

from grpcbridge.demo import MAX_TEXT_LENGTH, todo_pb2

__all__ = ["MAX_TEXT_LENGTH", "InvalidTextError", "Refusal", "TodoStore", "UnknownTodoError",
           "text_error"]

#: A change feed subscriber: called with each change (see :meth:`TodoStore.subscribe`).
Deliver = Callable[[todo_pb2.SyncResponse], object]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS todos ("
    "id TEXT PRIMARY KEY, text TEXT NOT NULL, done INTEGER NOT NULL, position INTEGER NOT NULL)"
)


def text_error(text: str, max_length: int | None = None) -> str | None:
    """Why ``text`` is not a valid todo text, or ``None`` if it is.

    Empty and whitespace-only text is refused; with ``max_length``, so is text longer than
    that many characters, and every message names the allowed range."""
    blank = not text or text.isspace()
    if max_length is None:
        return "text must not be empty" if blank else None
    if blank:
        return f"text must not be empty (1-{max_length} characters)"
    if len(text) > max_length:
        return f"text must be 1-{max_length} characters, got {len(text)}"
    return None


class Refusal(Exception):
    """A request the Todo service refuses: ``code`` names the gRPC status, ``str(error)`` is
    the message (both services send the same)."""

    code = "INVALID_ARGUMENT"
    __str__ = Exception.__str__  # the message as is (KeyError's would quote it)


class InvalidTextError(Refusal, ValueError):
    """A todo text that :func:`text_error` refuses; ``str(error)`` is the reason."""


class UnknownTodoError(Refusal, KeyError):
    """No todo has this id: ``NOT_FOUND`` "todo '<id>' not found"."""

    code = "NOT_FOUND"

    def __init__(self, todo_id: str) -> None:
        super().__init__(f"todo {todo_id!r} not found")


class TodoStore:
    """Todo storage shared by all RPC threads; every operation holds one lock."""

    def __init__(self, path: str = ":memory:", *, max_text_length: int | None = None) -> None:
        """Open (creating if needed) the sqlite database at ``path``. ``max_text_length``:
        the longest todo text accepted (in characters), or None for no upper limit."""
        if max_text_length is not None and max_text_length < 1:
            raise ValueError(f"max_text_length must be at least 1, got {max_text_length}")
        self.max_text_length = max_text_length
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(_SCHEMA)
        self._subscribers: set[Deliver] = set()

    def check_text(self, text: str) -> None:
        """Raise :class:`InvalidTextError` if ``text`` is not a valid todo text here."""
        error = text_error(text, self.max_text_length)
        if error is not None:
            raise InvalidTextError(error)

    def create(self, text: str) -> todo_pb2.Todo:
        """Insert a new, not-done todo and return it; :class:`InvalidTextError` if the text
        is refused (see :meth:`check_text`)."""
        self.check_text(text)
        todo_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO todos (id, text, done, position) "
                "VALUES (?, ?, 0, (SELECT COALESCE(MAX(position), 0) + 1 FROM todos))",
                (todo_id, text),
            )
            return self._publish_todo(todo_pb2.Todo(id=todo_id, text=text, done=False))

    def list(self) -> list[todo_pb2.Todo]:
        """Return all todos in creation order."""
        with self._lock:
            rows = self._db.execute("SELECT id, text, done FROM todos ORDER BY position").fetchall()
        return [todo_pb2.Todo(id=i, text=t, done=bool(d)) for i, t, d in rows]

    def update(self, todo_id: str, text: str, done: bool) -> todo_pb2.Todo:
        """Replace text and done flag of ``todo_id``; raise :class:`UnknownTodoError` for an
        unknown id, else :class:`InvalidTextError` for a refused text (the id is checked
        first)."""
        with self._lock:
            known = self._db.execute("SELECT 1 FROM todos WHERE id = ?", (todo_id,)).fetchone()
            if known is None:
                raise UnknownTodoError(todo_id)
            self.check_text(text)
            self._db.execute(
                "UPDATE todos SET text = ?, done = ? WHERE id = ?", (text, int(done), todo_id)
            )
            return self._publish_todo(todo_pb2.Todo(id=todo_id, text=text, done=done))

    def delete(self, todo_id: str) -> None:
        """Delete ``todo_id``; raise :class:`UnknownTodoError` if unknown."""
        with self._lock:
            cur = self._db.execute("DELETE FROM todos WHERE id = ?", (todo_id,))
            if cur.rowcount == 0:
                raise UnknownTodoError(todo_id)
            self._publish(todo_pb2.SyncResponse(deleted_id=todo_id))

    def paced(self, request: todo_pb2.StreamTodosRequest) -> Iterator[tuple[float, todo_pb2.Todo]]:
        """What ``StreamTodos`` sends: each todo with the seconds to wait before it. The
        current list ``repeat`` times (``repeat <= 0``: once), ``interval_ms`` between
        consecutive todos."""
        pause = 0.0
        for _ in range(max(request.repeat, 1)):
            for todo in self.list():
                yield pause, todo
                pause = max(request.interval_ms, 0) / 1000

    def subscribe(self, deliver: Deliver) -> None:
        """Call ``deliver`` with every subsequent change, from the thread that made it and
        with the lock held (so in commit order): it must not block nor use the store."""
        with self._lock:
            self._subscribers.add(deliver)

    def unsubscribe(self, deliver: Deliver) -> None:
        """Stop calling ``deliver``; unknown ones are ignored (idempotent)."""
        with self._lock:
            self._subscribers.discard(deliver)

    def apply_sync(self, request: todo_pb2.SyncRequest) -> str | None:
        """Perform one ``SyncTodos`` action (both services share this rule); return an
        error message for the requesting client, or ``None`` on success."""
        action = request.WhichOneof("action")
        try:
            if action == "create":
                self.create(request.create.text)
            elif action == "update":
                self.update(request.update.id, request.update.text, request.update.done)
            elif action == "delete":
                self.delete(request.delete.id)
            else:
                return "SyncRequest without action"
        except Refusal as exc:
            return str(exc)
        return None

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def _publish_todo(self, todo: todo_pb2.Todo) -> todo_pb2.Todo:
        self._publish(todo_pb2.SyncResponse(todo=todo))
        return todo

    def _publish(self, change: todo_pb2.SyncResponse) -> None:
        # Called with the lock held, so all subscribers see changes in commit order.
        for deliver in self._subscribers:
            deliver(change)
