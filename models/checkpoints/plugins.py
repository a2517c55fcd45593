"""Plugins: the operator's own Python code that registers architectures and attention probes.

    python -m viz export --plugin my_models.py --checkpoint mine.pth ...
    ATTENTION_LENS_PLUGINS=my_models.py:lab.attention make app

A plugin is a `.py` file or an importable module name. Importing it runs it: it calls
`models.register_architecture(...)` for its networks and `viz.register_attention(...)` for its
attention modules. Plugins are trusted code chosen by whoever starts the app or the command,
never something a browser user can upload. A plugin that fails is reported in one line (its
name and the exception) and left out; everything else keeps working.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

__all__ = [
    "PLUGINS_ENV",
    "PluginError",
    "forget_plugins",
    "load_plugin",
    "load_plugins",
    "plugins_from_env",
]

PLUGINS_ENV = "ATTENTION_LENS_PLUGINS"
_loaded: dict[str, object] = {}


class PluginError(ImportError):
    """A plugin could not be loaded; the message is one line naming it and the cause."""


def load_plugin(spec: str) -> object:
    """Import one plugin (a `.py` path or a module name) once per process; return the module.

    Raises:
        PluginError: the file is missing or the plugin raised while importing.
    """
    spec = spec.strip()
    if not spec:
        raise PluginError("empty plugin name")
    if spec in _loaded:
        return _loaded[spec]
    try:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            module = _import_file(Path(spec))
        else:
            module = importlib.import_module(spec)
    except PluginError:
        raise
    except BaseException as exc:  # a plugin may raise anything, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = " ".join(str(exc).split())[:200]
        raise PluginError(f"plugin {spec!r} failed: {type(exc).__name__}: {text}") from exc
    _loaded[spec] = module
    return module


def _import_file(path: Path) -> object:
    if not path.is_file():
        raise PluginError(f"plugin {str(path)!r}: no such file")
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    name = f"attention_lens_plugin_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def forget_plugins() -> None:
    """Forget which plugins were imported (tests; a plugin imported again registers again)."""
    _loaded.clear()


def load_plugins(specs: list[str]) -> list[str]:
    """Load each plugin; return one error line per plugin that failed (the rest are loaded)."""
    errors = []
    for spec in specs:
        try:
            load_plugin(spec)
        except PluginError as exc:
            errors.append(str(exc))
    return errors


def plugins_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The plugin list of `ATTENTION_LENS_PLUGINS` (separated by `:` or `,`)."""
    value = (environ if environ is not None else os.environ).get(PLUGINS_ENV, "")
    return [part.strip() for part in value.replace(",", ":").split(":") if part.strip()]
