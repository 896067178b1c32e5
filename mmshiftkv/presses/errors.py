"""What a press raises or warns when it cannot compress correctly."""


class CompressionSkippedWarning(UserWarning):
    """A press was asked to compress and left (part of) the cache uncompressed."""


class UnsupportedCacheError(TypeError):
    """The cache ``generate`` (or the caller) uses is not one a press can compress."""


class PressUsageError(RuntimeError):
    """A press was used in a way that would silently give wrong output (refused up front)."""
