"""One word per idea: no word the glossary retired (docs/architecture.md, "Retired words") is
back in the package's strings (messages, help, docstrings) or in the docs."""

import ast
import pathlib
import re

from delf_index.schemas.artifact import BEFORE_7

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "docs" / "architecture.md"
PACKAGE = ("delf_index", "pipelines", "indexing", "runtime", "schemas", "model")
LEGACY = set(BEFORE_7.values())  # names earlier formats used: readers still accept them


def retired_words():
    """The first column of the glossary's table of retired words."""
    section = GLOSSARY.read_text().split("### Retired words", 1)[1]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")]
    return [word for word in rows[2:] if word]  # after the header and the separator


def retired_in(text, words):
    """The retired words in `text`; an old file name (`hidden.npy`) names a format, not an idea."""
    return [word for word in words if re.search(rf"\b{re.escape(word)}\b(?!\.npy)", text, re.IGNORECASE)]


def strings_of(source):
    """(line, text) of each string literal of a module: messages, f-string parts, help, docstrings."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value not in LEGACY:
            yield node.lineno, node.value


def doc_lines(path):
    """(line number, text) of a Markdown file, without the glossary's own list of retired words."""
    text = path.read_text()
    if path == GLOSSARY:
        text = text.split("### Retired words", 1)[0]
    return enumerate(text.splitlines(), 1)


def offences(words):
    found = []
    for folder in PACKAGE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in strings_of(path.read_text()):
                found += [f"{path.relative_to(ROOT)}:{line}: {w}" for w in retired_in(text, words)]
    for path in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line, text in doc_lines(path):
            found += [f"{path.relative_to(ROOT)}:{line}: {w}" for w in retired_in(text, words)]
    return found


def test_no_retired_word_is_back():
    words = retired_words()
    assert "hidden" in words  # the table is read: an empty list would pass anything
    assert not offences(words), "retired words (docs/architecture.md, Retired words) are back"


def test_the_check_sees_a_retired_word_in_a_message():
    source = 'def f(n):\n    """Rows."""\n    say(f"{n} images added, {n} hidden")\n    np.load("hidden.npy")\n'
    found = [(line, retired_in(text, ["hidden"])) for line, text in strings_of(source)]
    assert [(line, words) for line, words in found if words] == [(3, ["hidden"])]
    assert retired_in("Hidden images are never ranked", ["hidden"]) == ["hidden"]
