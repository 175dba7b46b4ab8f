"""HTTP/2 frame size for the grpclib protocols grpcbridge runs on a tunnel.

HTTP/2 peers send frames of at most 16 KiB until told otherwise (SETTINGS_MAX_FRAME_SIZE).
grpclib never says otherwise, so a 256 KiB gRPC message crosses as 17 DATA frames, and each
costs h2 and grpclib Python work on both ends. grpcbridge's own protocols (both channels and
the in-process ``GrpclibBackend``) advertise a larger size, 1 MiB by default, kept below the
WebSocket message limit of the side that receives the frames. Measured: about 30 % less CPU
per MiB streamed in process, and +30 % download in the browser (docs/benchmarks.md).

The sizes are checked and fitted here (pure arithmetic); telling a grpclib protocol's h2
connection about them is :func:`grpcbridge._grpclib_compat.advertise_max_frame_size` (it
reaches into grpclib internals, like everything in that module).
"""

from __future__ import annotations

from .core.age import FRAME_HEADER_BYTES, H2_MIN_FRAME_SIZE
from .core.errors import ConfigError

#: HTTP/2's largest SETTINGS_MAX_FRAME_SIZE (RFC 9113, 6.5.2).
H2_MAX_FRAME_SIZE = 16_777_215
#: What grpcbridge's protocols advertise unless told otherwise.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024


def fit_frame_size(size: int, max_message_bytes: int | None) -> int:
    """``size``, lowered so that a frame and its header fit in one WebSocket message of
    ``max_message_bytes`` (None: no limit), but never below HTTP/2's 16 KiB."""
    if max_message_bytes is not None:
        size = min(size, max_message_bytes - FRAME_HEADER_BYTES)
    return max(H2_MIN_FRAME_SIZE, size)


def max_frame_size_for(requested: int | None, max_message_bytes: int | None) -> int:
    """The frame size to advertise: ``requested`` (validated: HTTP/2's limits, and room in a
    WebSocket message of ``max_message_bytes``), or the default fitted to that room."""
    if requested is None:
        return fit_frame_size(DEFAULT_MAX_FRAME_SIZE, max_message_bytes)
    if not H2_MIN_FRAME_SIZE <= requested <= H2_MAX_FRAME_SIZE:
        raise ConfigError(f"max_frame_size must be {H2_MIN_FRAME_SIZE} to {H2_MAX_FRAME_SIZE} "
                          f"(HTTP/2's limits), got {requested}")
    if fit_frame_size(requested, max_message_bytes) != requested:
        raise ConfigError(f"max_frame_size {requested} plus the {FRAME_HEADER_BYTES}-byte frame "
                          f"header must fit in max_message_bytes ({max_message_bytes}): "
                          "lower one or raise the other")
    return requested

