"""The user's documentation: a short README, pictures and links that resolve, and no words about how
the work was done (in the docs, code comments and test names)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_WORDS = 1500
SKIP_DIRS = {".git", ".venv", "runs", "wandb", "__pycache__", ".pytest_cache", "build", "dist"}
TEXT_SUFFIXES = {".md", ".py", ".cpp", ".h", ".sh", ".yaml", ".yml", ".sbatch", ".toml", ".cfg"}

# Words about the work rather than the product: tickets, sessions, which machine the author had.
PROCESS_WORDS = [
    (r"\bissues?\s*#?\d+", "a ticket number"),
    (r"\b(the|this|that)\s+issue('s)?\b", "a reference to a ticket"),
    (r"\bdev(elopment)?\s+(machine|box|vm)\b", "the author's machine instead of its hardware"),
    (r"\b(before|after|since)\s+(this|the|that)\s+(change|commit|patch|fix|pr)\b", "history of the work"),
    (r"\b(this|that|the\s+last|the\s+previous|an?\s+earlier)\s+session\b", "a work session"),
    (r"\bsession\s+before\b", "a work session"),
    (r"\b(no|a)\s+GPU\s+(was|were|is)\s+(available|lent|given)\b", "which hardware the author had"),
    (r"\b(was|were)\s+(not\s+)?lent\b", "which hardware the author had"),
    (r"\bgoals?\s+of\s+(the\s+)?issue", "a ticket's goals"),
]
PROCESS_RE = [(re.compile(p, re.IGNORECASE), why) for p, why in PROCESS_WORDS]
TEST_NAME_WORDS = re.compile(r"issue_?\d|regression_?\d|dev_machine|this_change|session_?\d", re.IGNORECASE)


def repo_files(suffixes=TEXT_SUFFIXES):
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in suffixes:
            yield path


def doc_pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def strip_comments(markdown: str) -> str:
    """Markdown without its HTML comments (placeholders that do not render)."""
    return re.sub(r"<!--.*?-->", "", markdown, flags=re.DOTALL)


def links(markdown: str) -> list[tuple[str, bool]]:
    """``(target, is_image)`` of every markdown link, image and ``<img src>`` outside comments."""
    text = strip_comments(markdown)
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)          # code blocks hold commands, not links
    out = [(m.group(2), m.group(1) == "!") for m in re.finditer(r"(!?)\[[^\]]*\]\(([^)\s]+)\)", text)]
    out += [(m.group(1), True) for m in re.finditer(r"<img[^>]*\bsrc=\"([^\"]+)\"", text)]
    return out


def find_process_words(text: str) -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for regex, why in PROCESS_RE:
            m = regex.search(line)
            if m:
                found.append(f"{lineno}: {m.group(0)!r} ({why})")
    return found


# --- the checks themselves, on known text -------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Against the goals of issue 3", "see Issue #12", "measured on this dev machine",
    "Before this change it took 50 s", "no GPU was available", "No GPU was lent to this session",
    "the issue's estimate of 4 ms", "the session before"])
def test_process_words_are_caught(text):
    assert find_process_words(text)


@pytest.mark.parametrize("text", [
    "a 2-core AVX-512 x86 VM (AMD EPYC), torch 2.14.1", "torch.cuda.is_available()",
    "one local Ray session (2 CPUs) is shared", "files are written atomically",
    "the bytes handed out and not yet given back", "wandb issues no network calls offline"])
def test_ordinary_words_pass(text):
    assert not find_process_words(text)


def test_links_skip_comments_and_code_and_find_img_tags():
    text = ('![a](images/a.png) [page](gan.md#x) <img src="images/b.png" width="3">\n'
            '<!-- ![later](images/c.png) -->\n```\n![not](x.png)\n```\n')
    assert links(text) == [("images/a.png", True), ("gan.md#x", False), ("images/b.png", True)]


# --- the repository ------------------------------------------------------------------------------

def test_readme_is_a_short_guide():
    words = len(ROOT.joinpath("README.md").read_text().split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words; move detail into docs/"


def test_every_linked_image_and_page_exists():
    missing, images = [], 0
    for page in doc_pages():
        for target, is_image in links(page.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            images += is_image
            if not path.is_file():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
            elif is_image:
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{target} is not a PNG"
                assert path.stat().st_size < 400_000, f"{target} is {path.stat().st_size} bytes; keep it small"
    assert not missing, "links to missing files:\n" + "\n".join(missing)
    assert images >= 4   # the README and docs show the results as pictures


def test_docs_and_code_have_no_process_words():
    offenders = []
    for path in repo_files():
        if path == Path(__file__).resolve():   # this file holds the examples the check must catch
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".md":
            text = strip_comments(text)
        offenders += [f"{path.relative_to(ROOT)}:{hit}" for hit in find_process_words(text)]
    assert not offenders, "process words:\n" + "\n".join(offenders)


def test_test_names_describe_behaviour():
    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and TEST_NAME_WORDS.search(node.name):
                bad.append(f"{path.name}::{node.name}")
    assert not bad, bad


PATH_RE = re.compile(r"(?<![\w/.<>-])((?:[\w.-]+/)+[\w.-]+\.(?:py|sh|sbatch|yaml|cpp|json|txt|pt))(?![\w/<>])")


def command_paths(markdown: str) -> list[str]:
    """Repository files a page names in code: its code blocks' commands (comments left out) and its
    inline code spans. Paths under runs/ (what a run writes) and absolute paths are not files of the
    repository."""
    text = strip_comments(markdown)
    spans = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        spans += [line.split("#", 1)[0] for line in block.splitlines()]
    spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return [m for span in spans for m in PATH_RE.findall(span) if not m.startswith(("runs/", "/"))]


def test_command_paths_finds_scripts_and_configs():
    text = "```bash\npython trainers/gan.py --out runs/x/y.py  # see docs/z.py\n" \
           "accelerate launch --config_file launch/gpu_1.yaml tune/lstm_sweep.py\n```\n" \
           "The file `models/csrc/lstm_cell.cpp`, `runs/<run>/metrics.json` and `<file>_eval/x.json`.\n"
    assert command_paths(text) == ["trainers/gan.py", "launch/gpu_1.yaml", "tune/lstm_sweep.py",
                                   "models/csrc/lstm_cell.cpp"]


def test_every_script_and_config_the_docs_run_exists():
    missing = [f"{page.relative_to(ROOT)}: {path}" for page in doc_pages()
               for path in command_paths(page.read_text()) if not (ROOT / path).is_file()]
    assert not missing, missing
