"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml; excluded from the pages).

1. Figures from the repository. ``docs/benchmarks.md`` links its plots as ``../bench/results/...`` so that the file
   reads right where it lies (GitHub, an editor). The site copies every file a page links that way to
   ``bench/results/...`` and rewrites those links. A link to a file that does not exist is left alone, so that
   ``mkdocs build --strict`` fails on it as on any broken link.
2. The table of ``dwdp_ops``'s exports. ``<!-- dwdp_ops exports -->`` in ``api/index.md`` becomes a table of every
   name in ``dwdp_ops.__all__`` (read statically with griffe, nothing imported): the name linked to the object's
   documentation in its module's page, the module, and the first sentence of its docstring. An export whose module
   has no page breaks its link, and the strict build fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe
from mkdocs.structure.files import File

_REPO_LINK = re.compile(r"\]\(\.\./(bench/results/[^)\s]+)\)")
_EXPORTS_MARKER = "<!-- dwdp_ops exports -->"


def _root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files, config):
    root, docs = _root(config), Path(config["docs_dir"])
    wanted = set()
    for path in docs.rglob("*.md"):
        wanted.update(_REPO_LINK.findall(path.read_text(encoding="utf-8")))
    for rel in sorted(wanted):
        src = root / rel
        if src.is_file() and files.get_file_from_path(rel) is None:
            files.append(File.generated(config, rel, abs_src_path=str(src)))
    return files


def on_page_markdown(markdown, page, config, files):
    root = _root(config)

    def relink(m: re.Match) -> str:
        rel = m.group(1)
        if not (root / rel).is_file():
            return m.group(0)
        up = "../" * page.file.src_uri.count("/")
        return f"]({up}{rel})"

    markdown = _REPO_LINK.sub(relink, markdown)
    if _EXPORTS_MARKER in markdown:
        markdown = markdown.replace(_EXPORTS_MARKER, _exports_table(root))
    return markdown


def _first_sentence(doc: str, limit: int = 200) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?\.)(\s|$)", para)
    text = m.group(1) if m else para
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text.replace("|", "\\|")


def _summary(obj) -> str:
    """The first sentence of the object's docstring; for a class without one, of its module's (such a module
    documents its main class)."""
    for candidate in (obj, obj.parent if obj.is_class else None):
        if candidate is not None and candidate.docstring:
            return _first_sentence(candidate.docstring.value)
    return ""


def _exports_table(root: Path) -> str:
    pkg = griffe.load("dwdp_ops", search_paths=[str(root / "python")], allow_inspection=False)
    rows = ["| name | from | what it is |", "| --- | --- | --- |"]
    for name in sorted(pkg.exports or (), key=str.lower):
        obj = pkg[name]
        target = obj.final_target if obj.is_alias else obj
        module = target.path.rsplit(".", 1)[0]
        rows.append(f"| [`{name}`][{target.path}] | `{module}` | {_summary(target)} |")
    return "\n".join(rows)
