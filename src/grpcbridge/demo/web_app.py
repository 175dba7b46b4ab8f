"""The browser demo's Todo app: Python running in the page (Pyodide), talking gRPC.

``loader.js`` (in ``grpcbridge/demo/web``) boots Pyodide, installs the wheels and calls
:func:`main`. Every read and write is a gRPC call made from here through
:class:`grpcbridge.browser.Channel` with the grpclib stubs of ``todo.v1.TodoService``:

* add: ``CreateTodo`` (unary); edit the text and toggle done: ``UpdateTodo``; delete:
  ``DeleteTodo``; add many (one per line): ``BulkCreateTodos`` (client streaming);
* the list: ``SyncTodos`` (bidirectional streaming) is opened first, so the server subscribes
  this page to the change feed of every client, then ``StreamTodos`` (server streaming) loads
  the current list; changes from the feed are applied on top, so several tabs (or browsers)
  show each other's changes at once;
* the server decides what a valid todo is: an empty or over-long text is sent like any other
  and the server's ``INVALID_ARGUMENT`` message (which names the limit) is shown on the page;
* connection status: connecting, connected, reconnecting (with the reason and the next
  attempt). A lost tunnel (bridge restarted, network gone) is retried with backoff and the
  list is loaded again after each reconnect.

DOM access goes through Pyodide's ``js`` module and ``pyodide.ffi.create_proxy``, imported
lazily (:mod:`grpcbridge.browser._ffi`): under CPython this module imports (linters, type
checkers) but cannot run. Elements carry stable ids and ``data-testid`` attributes for the
browser tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable, Coroutine
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from grpcbridge.browser import Channel, _ffi
from grpcbridge.core.config import ReconnectPolicy
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.todo_grpc import TodoServiceStub

__all__ = ["TodoApp", "describe_error", "main"]

#: Seconds an action RPC (add, edit, delete...) may take before it is reported as failed.
RPC_TIMEOUT = 15.0
#: Reconnect backoff: first retry after about 0.25 s, doubling up to 3 s (+/- 20 %).
RETRY = ReconnectPolicy(initial_delay=0.25, multiplier=2, max_delay=3.0)
#: Entries kept in the "gRPC calls from this page" list.
LOG_ENTRIES = 8


def describe_error(exc: BaseException) -> str:
    """A short, human-readable reason for a failed RPC or a lost connection."""
    if isinstance(exc, GRPCError):
        return f"{exc.status.name}: {exc.message}" if exc.message else exc.status.name
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class TodoApp:
    """The app: state (the todos, in server order), the DOM, the sync loop and the actions."""

    def __init__(self, grpc_path: str = "/grpc") -> None:
        self._js = _ffi.js()
        # Backoff between attempts is this app's (see _sync_forever), so the channel itself
        # retries at once whenever asked.
        self.channel = Channel(grpc_path, reconnect=ReconnectPolicy(
            initial_delay=0, max_delay=0, jitter=0, min_connect_timeout=10))
        self.stub = TodoServiceStub(self.channel)
        #: id -> todo, in the server's order (creation order).
        self.todos: dict[str, todo_pb2.Todo] = {}
        self._items: dict[str, Any] = {}  # id -> <li>
        self._editing: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._connected_once = False
        self._failures = 0
        self._feed_entry: Any = None
        self._counts_pending = False
        self._feed_count = 0
        self.first_attempt: asyncio.Future[tuple[bool, str]] = (
            asyncio.get_running_loop().create_future())
        self._element = self._js.document.getElementById
        self._list = self._element("todo-list")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Wire the page's controls and start the sync loop."""
        self._listen(self._element("new-form"), "submit", self._on_submit)
        self._listen(self._element("bulk-add"), "click", lambda _event: self._spawn(self._bulk()))
        for kind in ("click", "change", "dblclick", "keydown", "focusout"):
            self._listen(self._list, kind, self._on_list_event)
        self._listen(self._js.window, "online", lambda _event: self._wake.set())
        self._element("app").hidden = False
        self._render_counts()
        self._spawn(self._sync_forever())

    def _listen(self, target: Any, kind: str, handler: Callable[[Any], None]) -> None:
        # The listener keeps the proxy alive as long as the page (it is never destroyed).
        target.addEventListener(kind, _ffi.ffi().create_proxy(handler))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that is kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------- sync loop

    async def _sync_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._set_status(None, "opening a new tunnel" if self._connected_once else
                             f"gRPC over WebSocket to {self.channel.target}")
            try:
                await self._sync_once()
                reason = "the server ended the sync stream"
            except Exception as exc:  # every failure is retried; the reason is shown
                reason = describe_error(exc)
            self._failures += 1
            if not self.first_attempt.done():
                self.first_attempt.set_result((False, reason))
            deadline = loop.time() + RETRY.delay(self._failures, random.random())
            self._wake.clear()
            while (left := deadline - loop.time()) > 0:
                self._set_status(None, f"{reason} · next try in {left:.1f} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(left, 0.5))
                    break  # the browser came back online: try now

    async def _sync_once(self) -> None:
        """One connection's life: subscribe, load the list, apply changes until it drops."""
        async with self.stub.SyncTodos.open() as sync:
            async with asyncio.timeout(RPC_TIMEOUT):  # a tunnel that opened but never answers
                await sync.send_request()
                # The server sends its headers, then subscribes this stream to the change
                # feed: anything committed after the snapshot below arrives on `sync`.
                await sync.recv_initial_metadata()
                started = self._now()
                snapshot = await self.stub.StreamTodos(todo_pb2.StreamTodosRequest())
            self._replace_all(snapshot)
            self._log("StreamTodos", "server stream", f"loaded {len(snapshot)} todos",
                      self._now() - started)
            self._failures = 0
            self._connected_once = True
            self._set_status("connected", f"{self.channel.target} · live updates (SyncTodos)")
            if not self.first_attempt.done():
                self.first_attempt.set_result((True, ""))
            async for event in sync:
                self._apply_event(event)

    def _apply_event(self, event: todo_pb2.SyncResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "todo":
            known = self.todos.get(event.todo.id)
            if known != event.todo:  # else it is shown already (our own change, say)
                self._upsert(event.todo, flash=True)
                self._feed_log("another client changed a todo" if known else "a todo was added")
        elif kind == "deleted_id":
            if event.deleted_id in self.todos:
                self._remove(event.deleted_id)
                self._feed_log("another client deleted a todo")
        elif kind == "error":
            self._show_error(f"sync: {event.error}")

    # ------------------------------------------------------------------- actions

    def _on_submit(self, event: Any) -> None:
        event.preventDefault()
        field = self._element("new-text")
        # Even an empty text is sent: the server's answer says what a todo may be.
        text = str(field.value).strip()
        field.value = ""
        self._spawn(self._create(text))

    async def _create(self, text: str) -> None:
        todo = await self._call("CreateTodo", todo_pb2.CreateTodoRequest(text=text),
                                "add the todo", lambda todo: f"added {_quote(todo.text)}")
        if todo is not None:
            self._upsert(todo)
            return
        field = self._element("new-text")
        if not str(field.value):
            field.value = text  # give the text back so nothing typed is lost
        field.focus()

    async def _update(self, todo_id: str, text: str, done: bool) -> None:
        todo = await self._call(
            "UpdateTodo", todo_pb2.UpdateTodoRequest(id=todo_id, text=text, done=done),
            "save the change",
            lambda todo: f"{'done' if todo.done else 'not done'}: {_quote(todo.text)}")
        if todo is not None:
            self._upsert(todo)
        elif todo_id in self.todos:
            self._fill(self._items[todo_id], self.todos[todo_id])  # show what the server has

    async def _delete(self, todo_id: str) -> None:
        text = self.todos[todo_id].text if todo_id in self.todos else todo_id
        if await self._call("DeleteTodo", todo_pb2.DeleteTodoRequest(id=todo_id),
                            "delete the todo", lambda _: f"deleted {_quote(text)}") is not None:
            self._remove(todo_id)

    async def _bulk(self) -> None:
        lines = str(self._element("bulk-text").value).splitlines()
        texts = [text for text in map(str.strip, lines) if text]
        result = self._element("bulk-result")
        if not texts:
            result.textContent = "Nothing to add: type one todo per line."
            return
        button = self._element("bulk-add")
        button.disabled = True
        result.textContent = f"sending {len(texts)} todos…"
        started = self._now()
        try:
            reply = await self._call(
                "BulkCreateTodos", [todo_pb2.CreateTodoRequest(text=text) for text in texts],
                "add the todos", lambda reply: f"{reply.created_count} requests in one stream")
        finally:
            button.disabled = False
        if reply is None:
            # The server stops at the first refused todo; those before it are added.
            result.textContent = ("Stopped (see above): the todos sent before the error "
                                  "may have been added.")
            return
        result.textContent = (f"Added {reply.created_count} todos in "
                              f"{self._now() - started:.0f} ms (one BulkCreateTodos stream)")
        self._element("bulk-text").value = ""

    async def _call(self, method: str, request: Any, what: str,
                    summary: Callable[[Any], str]) -> Any:
        """Run one RPC for the user (a list of requests: a client stream); log it with
        ``summary(reply)``; show a failure. Returns the reply, or None if it failed."""
        kind = "client stream" if isinstance(request, list) else "unary"
        started = self._now()
        try:
            reply = await getattr(self.stub, method)(request, timeout=RPC_TIMEOUT)
        # AssertionError: grpclib's call helpers assert that a reply came (shown as it is).
        except (GRPCError, StreamTerminatedError, OSError, TimeoutError, AssertionError) as exc:
            self._log(method, kind, describe_error(exc), self._now() - started, failed=True)
            # A refused input: the server's INVALID_ARGUMENT message says what is allowed.
            reason = (exc.message if isinstance(exc, GRPCError) and exc.message
                      and exc.status is Status.INVALID_ARGUMENT else describe_error(exc))
            hint = "" if self._element("app").dataset.connection == "connected" else \
                " The page reconnects by itself; try again in a moment."
            self._show_error(f"Could not {what}: {reason}.{hint}")
            return None
        self._log(method, kind, summary(reply), self._now() - started)
        self._element("app-error").hidden = True
        return reply

    # ------------------------------------------------------------ list events

    def _on_list_event(self, event: Any) -> None:
        target = event.target
        item = target.closest("li.todo")
        todo = None if item is None else self.todos.get(str(item.dataset.id))
        if todo is None:
            return
        role = str(target.dataset.testid or "")
        kind = str(event.type)
        key = str(event.key) if kind == "keydown" else ""
        if kind == "change" and role == "todo-toggle":
            self._spawn(self._update(todo.id, todo.text, bool(target.checked)))
        elif kind == "click" and role == "todo-delete":
            self._spawn(self._delete(todo.id))
        elif (kind, role) in (("click", "todo-edit"), ("dblclick", "todo-text")):
            self._begin_edit(todo.id)
        elif role == "todo-edit-input" and key == "Escape":
            self._end_edit(todo.id)
        elif role == "todo-edit-input" and (key == "Enter" or kind == "focusout"):
            event.preventDefault()
            self._commit_edit(todo.id, str(target.value))

    def _begin_edit(self, todo_id: str) -> None:
        if self._editing == todo_id:
            return
        if self._editing is not None:
            self._end_edit(self._editing)
        self._editing = todo_id
        text = self._items[todo_id].querySelector(".text")
        field = self._element_of("input", "edit-input", "todo-edit-input", type="text",
                                 value=self.todos[todo_id].text, ariaLabel="Edit todo")
        text.hidden = True
        text.before(field)
        field.focus()
        field.select()

    def _end_edit(self, todo_id: str) -> None:
        """Close the edit field of ``todo_id`` (the todo being edited, still listed)."""
        self._editing = None
        item = self._items[todo_id]
        item.querySelector(".edit-input").remove()
        item.querySelector(".text").hidden = False
        self._fill(item, self.todos[todo_id])

    def _commit_edit(self, todo_id: str, value: str) -> None:
        if self._editing != todo_id:
            return  # already committed (Enter, then the input lost focus)
        self._end_edit(todo_id)
        text = value.strip()
        todo = self.todos[todo_id]
        if text != todo.text:  # an emptied text is sent too: the server's refusal is shown
            # Shown now, confirmed by the RPC.
            self._items[todo_id].querySelector(".text").textContent = text
            self._spawn(self._update(todo_id, text, todo.done))

    # ----------------------------------------------------------------- rendering

    def _replace_all(self, todos: list[todo_pb2.Todo]) -> None:
        self._editing = None
        self.todos = {}
        self._items = {}
        self._list.replaceChildren()
        for todo in todos:
            self._upsert(todo)
        self._render_counts()  # also for an empty list

    def _upsert(self, todo: todo_pb2.Todo, *, flash: bool = False) -> None:
        self.todos[todo.id] = todo
        item = self._items.get(todo.id)
        if item is None:
            item = self._items[todo.id] = self._make_item(todo)
            self._list.appendChild(item)
        else:
            self._fill(item, todo)
            if flash:  # a layout between removing and adding the class restarts the animation
                item.classList.remove("flash")
                _ = item.offsetWidth
        if flash:
            item.classList.add("flash")
        self._render_counts()

    def _remove(self, todo_id: str) -> None:
        if self.todos.pop(todo_id, None) is None:
            return  # already gone (our delete and the feed's news of it)
        if self._editing == todo_id:
            self._editing = None
        self._items.pop(todo_id).remove()
        self._render_counts()

    def _element_of(self, tag: str, css: str, testid: str = "", **properties: str) -> Any:
        """A new ``<tag class=css data-testid=testid>`` (each only when given) with
        ``properties`` set."""
        element = self._js.document.createElement(tag)
        if css:
            element.className = css
        if testid:
            element.setAttribute("data-testid", testid)
        for name, value in properties.items():
            setattr(element, name, value)
        return element

    def _make_item(self, todo: todo_pb2.Todo) -> Any:
        item = self._element_of("li", "todo", "todo-item")
        item.setAttribute("data-id", todo.id)
        toggle = self._element_of("input", "toggle", "todo-toggle", type="checkbox",
                                  ariaLabel="Done")
        text = self._element_of("span", "text", "todo-text", title="Double-click to edit")
        actions = self._element_of("span", "actions")
        actions.append(
            self._element_of("button", "icon", "todo-edit", type="button", textContent="Edit"),
            self._element_of("button", "icon danger", "todo-delete", type="button",
                             textContent="Delete"))
        item.append(toggle, text, actions)
        self._fill(item, todo)
        return item

    def _fill(self, item: Any, todo: todo_pb2.Todo) -> None:
        item.setAttribute("data-done", "true" if todo.done else "false")
        item.querySelector(".toggle").checked = todo.done
        if self._editing != todo.id:
            item.querySelector(".text").textContent = todo.text

    def _render_counts(self) -> None:
        """Update the counts once this turn of the event loop is over (a bulk add brings
        hundreds of feed events in a row)."""
        if not self._counts_pending:
            self._counts_pending = True
            asyncio.get_running_loop().call_soon(self._render_counts_now)

    def _render_counts_now(self) -> None:
        self._counts_pending = False
        total = len(self.todos)
        done = sum(1 for todo in self.todos.values() if todo.done)
        noun = "todo" if total == 1 else "todos"
        self._element("todo-count").textContent = f"{total} {noun} · {done} done"
        self._element("empty").hidden = total > 0

    def _set_status(self, state: str | None, detail: str) -> None:
        """Show the connection ``state``; None: "connecting" until the first connection (also
        between failed attempts), "reconnecting" after."""
        state = state or ("reconnecting" if self._connected_once else "connecting")
        status = self._element("status")
        status.setAttribute("data-state", state)
        status.textContent = state
        self._element("status-detail").textContent = detail
        self._element("app").setAttribute("data-connection", state)

    def _show_error(self, message: str) -> None:
        box = self._element("app-error")
        box.textContent = message
        box.hidden = False

    def _feed_log(self, what: str) -> None:
        """Changes from the feed: consecutive ones share one entry with a count."""
        if self._feed_entry is not None:
            self._feed_count += 1
            self._feed_entry.querySelector(".what").textContent = \
                f"{self._feed_count} changes pushed by the server"
            return
        self._feed_count = 1
        self._feed_entry = self._log("SyncTodos", "bidi stream", what, None)

    def _log(self, method: str, kind: str, what: str, elapsed_ms: float | None,
             failed: bool = False) -> Any:
        """Add an entry to the list of calls (it ends a run of feed changes); return it."""
        self._feed_entry = None
        entry = self._element_of("li", "failed" if failed else "", "rpc-entry")
        for css, text in (("method", method), ("kind", kind), ("what", what),
                          ("ms", "" if elapsed_ms is None else f"{elapsed_ms:.1f} ms")):
            entry.append(self._element_of("span", css, textContent=text))
        log = self._element("rpc-log")
        log.prepend(entry)
        while log.children.length > LOG_ENTRIES:
            log.lastElementChild.remove()
        return entry

    def _now(self) -> float:
        return float(self._js.performance.now())


def _quote(text: str, limit: int = 40) -> str:
    short = text if len(text) <= limit else text[:limit - 1] + "…"
    return f"“{short}”"


_app: TodoApp | None = None


async def main(options: str = "{}") -> str:
    """Start the app (once per page) and wait for its first connection attempt.

    ``options``: JSON from ``loader.js`` (``{"grpcPath": "/grpc"}``). Returns JSON
    ``{"connected": bool, "reason": str}``; the app keeps running (and reconnecting) after.
    """
    global _app
    settings = json.loads(options or "{}")
    if _app is None:
        _app = TodoApp(str(settings.get("grpcPath") or "/grpc"))
        _app.start()
    try:
        connected, reason = await asyncio.wait_for(asyncio.shield(_app.first_attempt), 30)
    except TimeoutError:
        connected, reason = False, "no answer within 30 s"
    return json.dumps({"connected": connected, "reason": reason})
