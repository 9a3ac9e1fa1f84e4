"""One registry per extension axis (methods, losses, heads, head inits, prompt modes, TTE modes, backbone kinds).

    LOSSES = Registry("loss", flag="--loss")

    @LOSSES.register("focal")
    def focal_loss(train_counts, args): ...

    LOSSES.get("focal")       # the entry; an unknown name is a UserError listing the valid ones
    LOSSES.names()            # argparse choices, in registration order (the default first)

The CLI takes its `choices` from `names()`, so a new entry is usable from every script at once. A built-in entry whose
code imports torch is declared by name, "module:attr" (relative to `package`), and imported on its first `get`, as
transformers' lazy auto mappings do: the names (and so --help) need no heavy import.

    HEADS = Registry("head", package=__package__, declared={"cosine": ".heads:CosineHead"})
"""
import importlib

from .errors import UserError


def resolve(target, package=None):
    """The object "module:attr" names (a relative module is found in `package`), imported now."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module, package), attr)


class _Declared:
    """An entry named "module:attr", not imported yet."""

    def __init__(self, target, package):
        self.target, self.package = target, package


class Registry:
    def __init__(self, kind, flag=None, declared=None, package=None):
        self.kind = kind
        self.flag = flag or kind
        self._entries = {name: _Declared(target, package) for name, target in (declared or {}).items()}

    def register(self, name, obj=None):
        """`REG.register("x", obj)`, or `@REG.register("x")` on a function or class; a name is registered once."""
        def add(entry):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add if obj is None else add(obj)

    def unregister(self, name):
        """Remove an entry (tests that register a throw-away entry clean up with this)."""
        self._entries.pop(name)

    def get(self, name):
        if name not in self._entries:
            raise UserError(f"unknown {self.flag} {name!r}; choose one of {', '.join(self._entries)}")
        entry = self._entries[name]
        if isinstance(entry, _Declared):
            entry = self._entries[name] = resolve(entry.target, entry.package)
        return entry

    def names(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(list(self._entries))

    def __len__(self):
        return len(self._entries)

    def __repr__(self):
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
