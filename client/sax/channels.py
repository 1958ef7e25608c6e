"""gRPC channels of the client: one cached channel per model-server address, process-wide.

Channels reconnect quickly after a server restart (reconnect backoff capped at 2 s instead of
gRPC's 120 s) so a replica that comes back is used again soon, and go idle (no reconnect
attempts) after 5 minutes without calls, so channels to servers that left cost nothing.
"""

from __future__ import annotations

import logging
import threading

import grpc

logger = logging.getLogger(__name__)

#: Options of every client channel: short reconnect backoff, large messages.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.client_idle_timeout_ms", 5 * 60 * 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)

_lock = threading.Lock()
_channels: dict[str, grpc.Channel] = {}


def make_channel(address: str) -> grpc.Channel:
    """A new insecure channel to "ip:port" with the client's options (not cached)."""
    return grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))


def get_channel(address: str) -> grpc.Channel:
    """The process-wide cached channel to a model server address, created on first use."""
    with _lock:
        channel = _channels.get(address)
        if channel is None:
            channel = make_channel(address)
            _channels[address] = channel
            logger.debug("opened channel to %s", address)
        return channel


def close_all() -> None:
    """Closes every cached channel (in-flight calls on them are cancelled)."""
    with _lock:
        channels = list(_channels.values())
        _channels.clear()
    for channel in channels:
        channel.close()
