"""The documentation stays inside the repository and matches the code.

- No file of the project points outside the repository (the method doc used to live one level
  up, so every published copy had a dead link).
- Every relative link of every Markdown file resolves to a file or folder of the repository,
  and every `#anchor` to a heading of its target.
- Every `asyncpatch_jax.<module>.<name>` that docs/method.md names exists.
"""

import importlib
import os
import pathlib
import re
import subprocess
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# A pointer to the `shared` folder beside the repository (either kind of slash), or to the
# method and style notes that live there under any path.
OUTSIDE = re.compile(r"\.\.[/\\]+shared\b|\bshared[/\\]+(?:METHOD|STYLE)\.md")
# Inline links and images `[text](target)` / `![alt](target "title")`, read from their `](`
# so that a linked image `[![alt](image)](target)` gives both; reference definitions `[id]: target`.
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1\s*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
CODE_NAME = re.compile(r"`(asyncpatch_jax(?:\.\w+)+)`")
# What \nu, \nabla, \neq, \not and \newline leave at the start of a line when "\n" became a newline.
NEWLINE_REMNANT = re.compile(r"^\s*(?:u[_^{$\\]|abla\b|eq\b|ot\b|ewline\b)")
# Without git: the folders .gitignore leaves out, and .git itself.
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
                "workdirs", "build", os.path.join("results", "tmp")}


def project_files() -> list[pathlib.Path]:
  """The files of the project: tracked or new but not ignored (git), else a walk of the tree."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    names = [n for n in out.decode().split("\0") if n]
  except (OSError, subprocess.CalledProcessError):
    names = []
    for folder, dirs, files in os.walk(ROOT):
      rel = os.path.relpath(folder, ROOT)
      dirs[:] = [d for d in dirs if not d.endswith(".egg-info") and d not in SKIPPED_DIRS
                 and os.path.normpath(os.path.join(rel, d)) not in SKIPPED_DIRS]
      names += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
  return [ROOT / n for n in sorted(names) if (ROOT / n).is_file()]


def read_text(path: pathlib.Path) -> str | None:
  """The file as UTF-8 text, or None for a binary file."""
  data = path.read_bytes()
  if b"\0" in data:
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


def markdown_files() -> list[pathlib.Path]:
  return [p for p in project_files() if p.suffix.lower() == ".md"]


def strip_code(text: str) -> str:
  """Markdown without fenced code blocks and code spans (links there are not links)."""
  return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
  prose = strip_code(text)
  return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def heading_anchors(text: str) -> set[str]:
  """GitHub's heading ids: lower case, punctuation dropped, spaces to '-', '-N' for repeats."""
  anchors, seen = set(), {}
  for title in HEADING.findall(FENCE.sub("", text)):
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def link_problems(md: pathlib.Path, text: str) -> list[str]:
  """What is wrong with the relative links of one Markdown file (empty if nothing)."""
  problems = []
  for target in links(text):
    if SCHEME.match(target):
      continue  # http(s):, mailto: ...: not a file of the project
    path_part, _, anchor = target.partition("#")
    path_part = urllib.parse.unquote(path_part.split("?")[0])
    dest = (md.parent / path_part).resolve() if path_part else md
    where = f"{md.relative_to(ROOT)}: link {target!r}"
    if not dest.is_relative_to(ROOT):
      problems.append(f"{where} points outside the repository; link a file inside it")
    elif not dest.exists():
      problems.append(f"{where} names {dest.relative_to(ROOT)}, which does not exist")
    elif anchor and dest.suffix.lower() == ".md":
      if anchor.lower() not in heading_anchors(dest.read_text(encoding="utf-8")):
        problems.append(f"{where}: no heading of {dest.relative_to(ROOT)} has the id {anchor!r}")
  return problems


def resolve_name(name: str):
  """Imports the longest module prefix of a dotted name and reads the rest as attributes."""
  parts = name.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ModuleNotFoundError as e:
      if e.name is None or not ".".join(parts[:cut]).startswith(e.name):
        raise  # the module exists but one of its own imports is missing
      continue
    for attr in parts[cut:]:
      obj = getattr(obj, attr)
    return obj
  raise ModuleNotFoundError(name)


def test_nothing_points_outside_the_repository():
  offenders = []
  for path in project_files():
    text = read_text(path)
    if text is None:
      continue
    for number, line in enumerate(text.splitlines(), 1):
      if OUTSIDE.search(line):
        offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
  assert not offenders, ("these lines point to a folder outside the repository; point to "
                         "docs/method.md (or another file inside the repository) instead:\n"
                         + "\n".join(offenders))


def test_markdown_links_resolve_inside_the_repository():
  files = markdown_files()
  assert ROOT / "README.md" in files and METHOD in files
  problems = [p for md in files for p in link_problems(md, md.read_text(encoding="utf-8"))]
  assert not problems, "\n".join(problems)


def test_markdown_has_no_escaped_latex():
  """LaTeX whose backslash a script read as an escape: a control character (\\frac → form feed,
  \\bar → backspace, \\alpha → bell, \\tau → tab, \\rho → carriage return) or a line starting with
  what \\nu, \\nabla, \\neq, \\not or \\newline leave after their newline. Garbage on the page.
  Lines are split on newlines only (`str.splitlines` would swallow form feeds)."""
  problems = []
  for md in markdown_files():
    for number, line in enumerate(md.read_text(encoding="utf-8").split("\n"), 1):
      bad = sorted({f"U+{ord(c):04X}" for c in line if ord(c) < 32})
      if NEWLINE_REMNANT.match(line):
        bad.append("a line starting as \\n<...> would continue")
      if bad:
        problems.append(f"{md.relative_to(ROOT)}:{number}: {', '.join(bad)} in {line[:80]!r}")
  assert not problems, ("LaTeX read as escapes in Markdown (write it with a raw string or a "
                        "doubled backslash):\n" + "\n".join(problems))


def test_link_checker_catches_bad_links():
  """The checker itself: an outside link, a missing file and a missing anchor are all caught."""
  md = ROOT / "docs" / "example.md"
  text = ("[up](../../elsewhere/METHOD.md) [gone](missing.md) [anchor](method.md#no-such-part)\n"
          "[ok](method.md#the-path-elbo-and-its-estimator) [web](https://example.com/x)\n"
          "```\n[in code](nowhere.md)\n```\n`[span](nowhere.md)`\n"
          "[![badge](figures/no_badge.png)](figures/mnist_demo_samples.png)\n")
  problems = link_problems(md, text)
  assert len(problems) == 4, problems
  assert "outside the repository" in problems[0]
  assert "does not exist" in problems[1]
  assert "no heading" in problems[2]
  assert "no_badge.png" in problems[3]
  up, folder = "..", "shared"  # spelt apart so that this file does not point outside itself
  assert OUTSIDE.search(f"see {up}/{folder}/METHOD.md") and OUTSIDE.search(f"{up}\\{folder}")
  assert OUTSIDE.search(f"/work/{folder}/STYLE.md")
  assert not OUTSIDE.search("--workdir /shared/runs")


def test_method_doc_has_the_sections_others_edit():
  anchors = heading_anchors(METHOD.read_text(encoding="utf-8"))
  for section in ("the-path-elbo-and-its-estimator", "uncertainty-guided-acceleration",
                  "autoregressive-generation", "the-training-level-sampler",
                  "from-the-paper-to-the-code"):
    assert section in anchors, f"docs/method.md lost its section #{section}"


def test_every_name_in_the_method_doc_exists():
  text = METHOD.read_text(encoding="utf-8")
  code_map = text.split("## From the paper to the code", 1)[1]
  assert len(set(CODE_NAME.findall(code_map))) >= 30, "the code map lists too few names"
  missing = []
  for name in sorted(set(CODE_NAME.findall(text))):
    try:
      resolve_name(name)
    except (ImportError, AttributeError) as e:
      missing.append(f"{name}: {type(e).__name__}: {e}")
  assert not missing, ("docs/method.md names code that does not exist; update the doc:\n"
                       + "\n".join(missing))


@pytest.mark.parametrize("name", ["asyncpatch_jax.diffusion.elbo.no_such_function",
                                  "asyncpatch_jax.no_such_module.f"])
def test_resolve_name_fails_on_missing_names(name):
  with pytest.raises((ImportError, AttributeError)):
    resolve_name(name)
