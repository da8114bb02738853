"""One chat turn: open, generate, stream, finalize; the accumulator and the chunk encoder."""
