"""One chat turn: ``lifecycle`` (open, launch, generate, disconnect policy, finish), and
beside it ``accumulator``, ``chunks``, ``finalize``, ``replay`` and ``upkeep``."""
