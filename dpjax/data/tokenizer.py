"""Tokenizers: BERT WordPiece (via the `tokenizers` library) and bytes.

No hub download. DP-Cap uses bert-base-uncased's WordPiece vocabulary
(30,522 tokens): pass its ``vocab.txt`` to ``WordPieceTokenizer.
from_vocab_file``. ``train_wordpiece`` trains a vocabulary offline on PUBLIC
text (never on the private captions: a vocabulary is a released artefact and
a rare word in it can name a person or a record); ``shapes_tokenizer()`` is the tiny preset's whole-word vocabulary,
built deterministically from the synthetic caption grammar.

Common interface: ``encode``, ``encode_batch``, ``decode``, ``vocab_size``,
``pad_id`` (always 0), ``bos_id``, ``eos_id`` and ``encode_fixed(text,
max_len) -> int32[max_len]`` (bos + tokens + eos, truncated, padded with 0).
Tokenizers are picklable so they run inside grain worker processes.
"""

import os
from typing import Iterable, Sequence

import numpy as np

from dpjax import errors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
  """Base class: subclasses define encode, decode, vocab_size, bos/eos ids."""

  pad_id: int = 0
  bos_id: int
  eos_id: int

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_fixed(self, text: str | bytes, max_len: int) -> np.ndarray:
    """int32[max_len]: bos, tokens, eos, truncated to max_len, padded with 0.

    When truncating, the tokens are cut and eos is kept as the last id.
    """
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 (bos + eos), got {max_len}.")
    ids = self.encode(text)[:max_len - 2]
    out = np.full((max_len,), self.pad_id, np.int32)
    seq = [self.bos_id] + ids + [self.eos_id]
    out[:len(seq)] = seq
    return out

  def decode_fixed(self, ids: Sequence[int]) -> str:
    """Inverse of encode_fixed: drops bos, stops at eos, skips pads."""
    ids = [int(i) for i in ids]
    if ids and ids[0] == self.bos_id:
      ids = ids[1:]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.decode([i for i in ids if i != self.pad_id])


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: pad 0, bos 1, eos 2, byte b -> b + 3 (vocab 259)."""

  pad_id, bos_id, eos_id = 0, 1, 2
  _offset = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self._offset

  def encode(self, text: str) -> list[int]:
    return [b + self._offset for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self._offset for i in ids if int(i) >= self._offset)
    return data.decode("utf-8", errors="replace")


class WordPieceTokenizer(Tokenizer):
  """BERT-style WordPiece tokenizer backed by `tokenizers`.

  bos = [CLS], eos = [SEP]; the vocabulary must have [PAD] at id 0 (BERT's
  does).
  """

  def __init__(self, vocab: Sequence[str], lowercase: bool = True):
    import tokenizers  # pylint: disable=g-import-not-at-top
    # pylint: disable=g-import-not-at-top,g-multiple-import
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    self._vocab = list(vocab)
    self._lowercase = lowercase
    index = {t: i for i, t in enumerate(self._vocab)}
    for tok in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
      if tok not in index:
        raise ValueError(f"WordPiece vocabulary lacks {tok}; add it (BERT "
                         "vocab.txt has [PAD]=0, [UNK], [CLS], [SEP]).")
    if index["[PAD]"] != 0:
      raise ValueError(f"[PAD] must be id 0, got {index['[PAD]']}: put it on "
                       "the first line of vocab.txt.")
    tok = tokenizers.Tokenizer(models.WordPiece(index, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    self._tok = tok
    self.bos_id, self.eos_id = index["[CLS]"], index["[SEP]"]
    self.unk_id = index["[UNK]"]

  @classmethod
  def from_vocab_file(cls, path: str, lowercase: bool = True
                      ) -> "WordPieceTokenizer":
    """Loads a BERT ``vocab.txt`` (one token per line, line number = id)."""
    if not os.path.exists(path):
      raise errors.MissingFileError(
          f"tokenizer vocab file {path!r} not found: pass "
          "--config.data.tokenizer=wordpiece:<bert-base-uncased vocab.txt, "
          "30,522 lines>, or make one from PUBLIC text (never the private "
          "captions): python -m dpjax.data.tokenizer --text=<public.txt> "
          f"--vocab_size=30522 --out={path}")
    with open(path, encoding="utf-8") as f:
      vocab = [line.rstrip("\n") for line in f]
    return cls(vocab, lowercase=lowercase)

  def __getstate__(self):
    return {"vocab": self._vocab, "lowercase": self._lowercase}

  def __setstate__(self, state):
    self.__init__(state["vocab"], state["lowercase"])

  @property
  def vocab_size(self) -> int:
    return len(self._vocab)

  @property
  def vocab(self) -> list[str]:
    return list(self._vocab)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts),
                                                  add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def pad_vocab(vocab: Sequence[str], size: int) -> list[str]:
  """``vocab`` then ``[unused<i>]`` entries up to ``size`` (0: unchanged).

  BERT's vocab.txt reserves such never-produced slots too: the output head
  has the paper's size while text maps into the smaller real vocabulary.

  Raises:
    ValueError: ``vocab`` is longer than ``size``.
  """
  if size and size < len(vocab):
    raise ValueError(f"vocabulary of {len(vocab)} entries exceeds the "
                     f"requested size {size}")
  return list(vocab) + [f"[unused{i}]" for i in range(
      max(size - len(vocab), 0))]


def train_wordpiece(captions: Iterable[str], vocab_size: int,
                    out_path: str, lowercase: bool = True
                    ) -> WordPieceTokenizer:
  """Trains a WordPiece vocabulary offline and writes it as ``vocab.txt``.

  Privacy: the vocabulary is not differentially private. Train it on public
  text only; trained on private captions it leaks their rare words.

  Args:
    captions: PUBLIC training texts.
    vocab_size: vocabulary size (including special tokens); when the text
      has fewer distinct pieces the rest are ``[unused<i>]`` (pad_vocab).
    out_path: where to write the vocabulary (one token per line).
    lowercase: lowercase and strip accents (BERT uncased).

  Returns:
    The tokenizer loaded from ``out_path``.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top,g-multiple-import
  from tokenizers import models, normalizers, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      show_progress=False)
  tok.train_from_iterator(captions, trainer=trainer)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w", encoding="utf-8") as f:
    for token in pad_vocab([t for t, _ in vocab], vocab_size):
      f.write(token + "\n")
  return WordPieceTokenizer.from_vocab_file(out_path, lowercase=lowercase)


def shapes_tokenizer(vocab_size: int = 0) -> WordPieceTokenizer:
  """The tiny preset's tokenizer: special tokens + the synthetic grammar's
  words (``synthetic.VOCAB_WORDS``), whole words, deterministic; padded to
  ``vocab_size`` entries (pad_vocab) if given (`:paper,smoke`: 30,522)."""
  from dpjax.data import synthetic  # pylint: disable=g-import-not-at-top
  return WordPieceTokenizer(pad_vocab(
      list(SPECIAL_TOKENS) + list(synthetic.VOCAB_WORDS), vocab_size))


def make_tokenizer(spec: str) -> Tokenizer:
  """'bytes' | 'shapes' | 'shapes:<vocab_size>' |
  'wordpiece:<path/to/vocab.txt>'."""
  if spec == "bytes":
    return ByteTokenizer()
  if spec == "shapes" or spec.startswith("shapes:"):
    return shapes_tokenizer(int(spec.split(":", 1)[1]) if ":" in spec else 0)
  if spec.startswith("wordpiece:"):
    return WordPieceTokenizer.from_vocab_file(spec.split(":", 1)[1])
  raise ValueError(f"tokenizer={spec!r} is unknown: use 'bytes', 'shapes', "
                   "'shapes:<vocab_size>' or 'wordpiece:/path/to/vocab.txt'.")


def write_vocab(out_path: str, vocab_size: int,
                text_files: Sequence[str] = ()) -> WordPieceTokenizer:
  """A WordPiece vocab.txt of ``vocab_size`` entries trained on the PUBLIC
  ``text_files`` (one text per line) and the synthetic caption grammar's
  words (alone: enough for smoke runs, not for real captions)."""
  from dpjax.data import synthetic  # pylint: disable=g-import-not-at-top
  texts = [" ".join(synthetic.VOCAB_WORDS)]
  for path in text_files:
    with open(path, encoding="utf-8") as f:
      texts += [line.strip() for line in f if line.strip()]
  return train_wordpiece(texts, vocab_size, out_path)


def main(argv: Sequence[str]) -> None:
  """``python -m dpjax.data.tokenizer --out=vocab.txt --vocab_size=30522
  [--text=public.txt ...]``: write_vocab."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  tok = write_vocab(f.out, f.vocab_size, f.text)
  print(f"{f.out}: {tok.vocab_size} entries")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  absl_flags.DEFINE_string("out", None, "Where to write vocab.txt.")
  absl_flags.DEFINE_integer("vocab_size", 30522, "Entries (bert-base-uncased:"
                            " 30,522), padded with [unused<i>].")
  absl_flags.DEFINE_multi_string("text", [], "PUBLIC text files, one text "
                                 "per line (never the private captions).")
  absl_flags.mark_flags_as_required(["out"])
  app.run(main)
