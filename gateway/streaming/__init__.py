"""Streams to clients: the SSE response and the in-process relay of live turns."""
