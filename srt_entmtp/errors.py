"""Errors users see. Each message names the file or field at fault."""


class EntMTPError(Exception):
    """Base class for errors the engine reports to users."""


class ModelLoadError(EntMTPError):
    """A model directory, weight file or GGUF could not be loaded."""


class KVCacheFullError(EntMTPError):
    """The KV pool has no free slots for the request."""
