"""Griffe extension used by the documentation build (``mkdocs.yml``).

It does two things the stock Python handler cannot:

1. ``specdens.backends`` is the top-level ``backends/`` folder of the repository, installed
   as a subpackage by a ``package-dir`` mapping in ``pyproject.toml``. Griffe analyses the
   source tree and does not follow that mapping, so the folder is loaded here as the
   submodule ``backends`` of the ``specdens`` package (relative imports then resolve to
   ``specdens.backends.*``). An installed (non-editable) layout that already holds
   ``specdens/backends`` is left alone.
2. The docstrings use Sphinx roles (``:func:`specdens.lanczos```). They are rewritten into
   optional cross-references: a link where the target is documented on the site, plain
   code otherwise, never a build warning.
3. ``# doctest: +SKIP`` directives are dropped from the displayed examples (they are for
   doctest, not for the reader).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|attr|data|exc|obj):`(~?)([^`<>]+?)`")
SKIP_LINE = re.compile(r"^[ \t]*\.\.\.[ \t]*# doctest: \+SKIP[ \t]*\n?", re.MULTILINE)
SKIP_DIRECTIVE = re.compile(r"[ \t]*# doctest: \+SKIP")


class SpecdensDocs(griffe.Extension):
    """Attach ``backends/`` as ``specdens.backends`` and turn Sphinx roles into links."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        if pkg.name != "specdens":
            return
        if "backends" not in pkg.members:
            init = Path(pkg.filepath).parent.parent / "backends" / "__init__.py"
            if not init.exists():
                raise FileNotFoundError(f"specdens.backends: no {init}")
            # GriffeLoader has no public way to load a folder under another package's
            # name; _load_module(name, path, parent=...) is the one it uses itself.
            backends = loader._load_module("backends", init, submodules=True, parent=pkg)
            pkg.set_member("backends", backends)
            loader.expand_exports(backends)
            loader.expand_wildcards(backends, external=False)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = ROLE.sub(lambda m, o=obj: _link(m, o), obj.docstring.value)
                text = SKIP_DIRECTIVE.sub("", SKIP_LINE.sub("", text))
                obj.docstring.value = text


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _path(found: Any) -> str:
    """The canonical path of an object; for a submodule that shadows the function of the
    same name its package re-exports (``specdens.backends.torch.hessian``), the function."""
    if found.is_alias:
        found = found.final_target
    if found.is_module and found.name in found.members:
        member = found.members[found.name]
        if not member.is_module:
            return _path(member)
    return found.path


def _lookup(name: str, scope: Any) -> str | None:
    """The path of ``name`` seen from ``scope`` (its members, then its parents')."""
    first, _, rest = name.partition(".")
    node: Any = scope
    while node is not None:
        if first in node.members:
            target = node.members[first]
            try:
                for part in rest.split(".") if rest else ():
                    target = target.members[part]
                return _path(target)
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
        node = node.parent
    return None


def _link(match: re.Match, obj: griffe.Object) -> str:
    role, short, target = match.group(1), match.group(2) == "~", match.group(3).strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    if target.startswith("specdens."):
        try:
            target = _path(obj.modules_collection[target])
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            pass
    else:
        # Methods and attributes are looked up from the object outwards (a class's
        # own members first); functions, classes and modules from its module.
        scope = obj if role in ("meth", "attr") else obj.module
        target = _lookup(target, scope) or target
    return (f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>")
