"""Constants of the wire shared by every adapter (CPython relay and pipe, browser transport).

Defined once here, imported everywhere they apply, so the CPython side and the browser side
(``grpcbridge.browser``, Pyodide) can never disagree.
"""

from __future__ import annotations

import string

#: Writes made together (one event-loop iteration in CPython, one JavaScript task in the
#: browser) leave as one WebSocket message, sent at once when this many bytes are held. A
#: message never grows past it by coalescing (only a single larger write is sent as is), so
#: a peer accepting messages (and frames) of this size never refuses one (see grpcbridge.pipe).
COALESCE_LIMIT = 256 * 1024

#: The characters of an HTTP token (RFC 9110 ``tchar``): what a WebSocket subprotocol, and
#: so a ``bearer.<token>`` subprotocol entry, may consist of.
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
