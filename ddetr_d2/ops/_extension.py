"""Loads the compiled extension ``ddetr_d2._C`` and remembers why it is missing, if it is.

``get_extension()`` returns the module or ``None``; the first time the op has to fall back to the
pure-PyTorch path, ``warn_fallback`` emits one ``UserWarning`` naming the reason.
Set ``DDETR_REQUIRE_EXTENSION=1`` to make a missing extension an error instead.
"""

import importlib
import os
import warnings

__all__ = ["get_extension", "extension_error", "warn_fallback", "reset"]

_UNSET = object()
_extension = _UNSET
_error = None
_warned = set()


def _load():
    global _extension, _error
    try:
        _extension = importlib.import_module("ddetr_d2._C")
        _error = None
    except (ImportError, OSError) as e:  # not built, or built against another torch / CUDA
        _extension = None
        _error = f"{type(e).__name__}: {e}"


def get_extension():
    """The ``ddetr_d2._C`` module, or None if it cannot be imported."""
    if _extension is _UNSET:
        _load()
    if _extension is None and os.environ.get("DDETR_REQUIRE_EXTENSION", "0") == "1":
        raise ImportError(f"ddetr_d2._C is required (DDETR_REQUIRE_EXTENSION=1) but failed to load: {_error}")
    return _extension


def extension_error():
    """Why the extension could not be loaded (None if it loaded or was not tried yet)."""
    return _error


def warn_fallback(key, reason):
    """Warn once per ``key`` that the pure-PyTorch deformable attention is used, and why."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"ddetr_d2: using the slow pure-PyTorch multi-scale deformable attention because {reason}. "
        "Build the extension with `pip install --no-build-isolation -e .` in the repository.",
        UserWarning,
        stacklevel=3,
    )


def reset():
    """Forget the loaded module and the warnings already given (for tests)."""
    global _extension, _error
    _extension = _UNSET
    _error = None
    _warned.clear()
