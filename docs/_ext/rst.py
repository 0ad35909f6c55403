"""Build-time helpers of the API reference (see mkdocs.yml); not part of the package.

* `RstRoles`, a griffe extension: the docstrings are written with reStructuredText roles
  (``:func:`x```, ``:math:`x```, ``.. math::``); it turns them into the Markdown that
  mkdocstrings renders: math for MathJax (``pymdownx.arithmatex``) and optional
  cross-references (a link where some page renders the target, plain code otherwise).
* `on_page_markdown`, an mkdocs hook: ``<!-- README: Heading -->`` on a page becomes that section
  of README.md (the paper map), and ``<!-- public-api -->`` the table of ``dropsplit.__all__``,
  each name a link that must resolve (so a public name that no page renders fails the strict
  build).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).parents[2]
ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):`(~?)([\w.]+)(?:\(\))?`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
MATH_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:[ \t]*\n|(?P=indent)[ \t]+\S.*\n?)+)",
    re.M,
)


class RstRoles(griffe.Extension):
    """reStructuredText roles and math in the docstrings to Markdown, once a package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the docstring of every object of ``pkg`` (its submodules included)."""
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = to_markdown(obj, obj.docstring.value)


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not isinstance(member, griffe.Alias):
            yield from _objects(member)


def to_markdown(obj: griffe.Object, text: str) -> str:
    """``text`` (a docstring of ``obj``) with its reST math and roles in Markdown."""
    text = MATH_BLOCK.sub(_math_block, text + "\n").rstrip("\n")
    text = MATH_ROLE.sub(lambda m: f"${m[1]}$", text)
    return ROLE.sub(lambda m: _reference(obj, m[2], short=m[1] == "~"), text)


def _math_block(match: re.Match[str]) -> str:
    indent = match["indent"]
    lines = [line.strip() for line in match["body"].splitlines() if line.strip()]
    body = "\n".join(f"{indent}{line}" for line in lines)
    return f"{indent}$$\n{body}\n{indent}$$\n\n"


def _reference(obj: griffe.Object, name: str, *, short: bool) -> str:
    """An optional cross-reference to ``name`` as seen from ``obj``."""
    title = name.rsplit(".", 1)[-1] if short else name
    scopes = [obj.path, *(p.path for p in _parents(obj)), ""]
    for scope in scopes:
        target = _resolve(obj, f"{scope}.{name}" if scope else name)
        if target is not None:
            return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'
    return f"<code>{title}</code>"


def _parents(obj: griffe.Object):
    while obj.parent is not None:
        obj = obj.parent
        yield obj


def _resolve(obj: griffe.Object, path: str) -> str | None:
    """The canonical path of ``path`` in ``obj``'s collection (following aliases), if any."""
    for _ in range(8):
        try:
            found = obj.modules_collection[path]
        except Exception:  # unknown, or an alias that cannot be resolved: no link
            return None
        if not isinstance(found, griffe.Alias):
            return found.path
        path = found.target_path
    return None


# --- mkdocs hook ---------------------------------------------------------------------------------

README_SECTION = re.compile(r"<!-- README: (?P<heading>[^>]+?) -->")


def readme_section(heading: str) -> str:
    """The body of the README's ``## heading`` section, its ``dropsplit.*`` names linked."""
    text = (ROOT / "README.md").read_text()
    start = re.search(rf"^## {re.escape(heading)}\s*$", text, re.M)
    if start is None:
        raise ValueError(f"README.md has no section '## {heading}'")
    rest = text[start.end() :]
    end = re.search(r"^## ", rest, re.M)
    body = rest[: end.start() if end else len(rest)].strip()
    return re.sub(
        r"`(dropsplit(?:\.\w+)+)`",
        lambda m: f'<autoref identifier="{m[1]}" optional><code>{m[1]}</code></autoref>',
        body,
    )


def public_api() -> str:
    """A Markdown table of ``dropsplit.__all__``: name (linked), summary, defining module."""
    package = griffe.load("dropsplit", search_paths=[str(ROOT / "src")], resolve_aliases=True)
    rows = ["| `ds.` name | what it is | defined in |", "|---|---|---|"]
    for name in sorted(package.exports or [], key=str.lower):
        member = package[name]
        target = member.final_target if isinstance(member, griffe.Alias) else member
        if target.is_module and name in target.members:  # `convert` the function, not the module
            member = target[name]
            target = member.final_target if isinstance(member, griffe.Alias) else member
        doc = target.docstring.value if target.docstring else ""
        summary = doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        summary = MATH_ROLE.sub(lambda m: f"${m[1]}$", ROLE.sub(r"`\2`", summary))
        module = target.path if target.is_module else target.module.path
        rows.append(f"| [`ds.{name}`][{target.path}] | {summary} | `{module}` |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Fill the README sections and the public-API table into the pages that ask for them."""
    markdown = README_SECTION.sub(lambda m: readme_section(m["heading"]), markdown)
    if "<!-- public-api -->" in markdown:
        markdown = markdown.replace("<!-- public-api -->", public_api())
    return markdown
