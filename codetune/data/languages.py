"""Stage 2: language by file extension or file name, against an allow-list.

Extensions are the cheap, reliable signal for source files (the Stack was built the same way); content
sniffing would cost a pass over every file for little gain on code trees.
"""

from __future__ import annotations

from pathlib import PurePath

# The 18 languages of stable-code-3b's training mixture (its model card), Markdown among them.
STABLE_CODE_LANGUAGES = (
    "c", "cpp", "java", "javascript", "css", "go", "html", "ruby", "rust", "markdown", "shell", "php",
    "sql", "r", "typescript", "python", "jupyter", "restructuredtext",
)

EXTENSIONS: dict[str, str] = {
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".c++": "cpp", ".hh": "cpp", ".hpp": "cpp", ".hxx": "cpp",
    ".java": "java",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".css": "css", ".scss": "css",
    ".go": "go",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".rb": "ruby", ".rake": "ruby", ".gemspec": "ruby",
    ".rs": "rust",
    ".md": "markdown", ".markdown": "markdown",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell",
    ".php": "php",
    ".sql": "sql",
    ".r": "r",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript",
    ".py": "python", ".pyi": "python",
    ".ipynb": "jupyter",
    ".rst": "restructuredtext",
    # Outside the default allow-list; recognised so users can opt in (and so the JSON/YAML/XML rules apply).
    ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".xml": "xml", ".toml": "toml",
    ".kt": "kotlin", ".scala": "scala", ".swift": "swift", ".cs": "csharp", ".lua": "lua",
    ".pl": "perl", ".hs": "haskell", ".jl": "julia", ".dart": "dart", ".m": "objective-c",
}

FILENAMES: dict[str, str] = {
    "Makefile": "makefile", "Dockerfile": "dockerfile", "CMakeLists.txt": "cmake",
    "Rakefile": "ruby", "Gemfile": "ruby", ".bashrc": "shell", ".zshrc": "shell",
}

KNOWN = sorted(set(EXTENSIONS.values()) | set(FILENAMES.values()))


def detect(path: str | None) -> str | None:
    """The language of a path, or None when neither its name nor its extension is known."""
    if not path:
        return None
    p = PurePath(path)
    if p.name in FILENAMES:
        return FILENAMES[p.name]
    return EXTENSIONS.get(p.suffix.lower())


def allowed_languages(configured: list[str]) -> frozenset[str]:
    """The allow-list: the user's list, or stable-code-3b's languages when it is empty."""
    return frozenset(x.lower() for x in configured) if configured else frozenset(STABLE_CODE_LANGUAGES)


def check_languages(configured: list[str]) -> list[str]:
    """Names in the allow-list that no extension maps to (typos), for a config error."""
    return [x for x in configured if x.lower() not in KNOWN]
