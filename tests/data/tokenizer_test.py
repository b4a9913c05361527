"""Tests for dpjax.data.tokenizer."""

import pickle

import numpy as np
import pytest

from dpjax import errors
from dpjax.data import synthetic
from dpjax.data import tokenizer


def _all_tokenizers(tmp_path):
  caps = [synthetic.ShapesCaptions(200)[i]["caption"] for i in range(200)]
  trained = tokenizer.train_wordpiece(caps * 3, 60, str(tmp_path / "v.txt"))
  return [tokenizer.ByteTokenizer(), tokenizer.shapes_tokenizer(), trained]


def test_round_trip_and_fixed_length(tmp_path):
  ds = synthetic.ShapesCaptions(50, seed=5)
  for tok in _all_tokenizers(tmp_path):
    assert tok.pad_id == 0
    for i in range(50):
      cap = ds[i]["caption"]
      assert tok.decode(tok.encode(cap)) == cap
      fixed = tok.encode_fixed(cap, 64)
      assert fixed.dtype == np.int32 and fixed.shape == (64,)
      assert fixed[0] == tok.bos_id
      n = len(tok.encode(cap))
      assert fixed[n + 1] == tok.eos_id and np.all(fixed[n + 2:] == 0)
      assert tok.decode_fixed(fixed) == cap
    assert tok.encode_batch(["a red circle"]) == [tok.encode("a red circle")]
    short = tok.encode_fixed(ds[0]["caption"], 4)
    assert short.shape == (4,) and short[-1] == tok.eos_id


def test_shapes_vocab_is_whole_words_and_small():
  tok = tokenizer.shapes_tokenizer()
  assert tok.vocab_size == len(tokenizer.SPECIAL_TOKENS) + len(
      synthetic.VOCAB_WORDS)
  ids = tok.encode("a small red triangle above a large blue circle")
  assert len(ids) == 9 and tok.unk_id not in ids
  assert tok.encode(synthetic.zero_shot_prompts()[2])[-1] == tok.encode(
      "triangle")[0]
  # Deterministic and picklable (for grain workers).
  again = pickle.loads(pickle.dumps(tok))
  assert again.vocab == tokenizer.shapes_tokenizer().vocab
  assert again.encode("a red cross") == tok.encode("a red cross")


def test_from_vocab_file_bert_layout(tmp_path):
  vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + [
      "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circ", "##le"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n")
  tok = tokenizer.WordPieceTokenizer.from_vocab_file(str(path))
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 100, 101, 102)
  ids = tok.encode("A Red CIRCLE")
  assert ids == [104, 105, 106, 107]
  assert tok.decode(ids) == "a red circle"
  with pytest.raises(FileNotFoundError) as e:
    tokenizer.WordPieceTokenizer.from_vocab_file(str(tmp_path / "nope.txt"))
  # One line (dpjax.main prints a ConfigError without a traceback): the
  # file to pass and the command that makes one.
  assert isinstance(e.value, errors.ConfigError)
  assert "\n" not in str(e.value)
  for s in ("--config.data.tokenizer=wordpiece:", "30,522",
            "python -m dpjax.data.tokenizer", "--vocab_size=30522",
            f"--out={tmp_path / 'nope.txt'}"):
    assert s in str(e.value)
  with pytest.raises(ValueError, match="tokenizer="):
    tokenizer.make_tokenizer("sentencepiece")


def test_paper_size_vocabulary_without_a_download(tmp_path):
  """`shapes:30522` (the :paper,smoke head) and the vocab.txt command."""
  small = tokenizer.shapes_tokenizer()
  tok = tokenizer.make_tokenizer("shapes:30522")
  assert tok.vocab_size == 30522
  assert tok.vocab[-1] == f"[unused{30522 - small.vocab_size - 1}]"
  cap = "a small red triangle above a large blue circle"
  assert tok.encode(cap) == small.encode(cap)
  with pytest.raises(ValueError, match="exceeds"):
    tokenizer.pad_vocab(small.vocab, 10)
  public = tmp_path / "public.txt"
  public.write_text("a photo of a dog\nthe cat sat on the mat\n")
  made = tokenizer.write_vocab(str(tmp_path / "vocab.txt"), 30522,
                               [str(public)])
  assert made.vocab_size == 30522
  assert made.decode(made.encode("the cat sat")) == "the cat sat"
  assert made.encode(cap) and made.unk_id not in made.encode(cap)
