"""gateloop's tokenizers (bytes, byte-level BPE) as one transformers tokenizer, for AutoTokenizer.

Encoding and decoding go through the project's own tokenizer, so the ids are the ones the model was
trained on. What transformers adds is a special token: lm-evaluation-harness needs a prefix (BOS or
EOS) id to score a text from its first token. gateloop trains without one, so the export declares
the token of byte 0xFF: a byte that UTF-8 never contains, so encoding text never yields it and the
model never saw it in training, yet its id lies inside the vocabulary, and the weights, the
vocabulary and every loss of the project stay as they are. It serves as BOS, EOS and padding; the
tokenizer never adds it by itself (add_bos_token is off) and never matches its text in an input
(split_special_tokens), so `tokenizer(text).input_ids` are exactly gateloop's ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers
from transformers import PreTrainedTokenizer

from ..data import BPETokenizer, ByteTokenizer

BPE_FILE = "gateloop_bpe.json"
PREFIX_BYTE = 0xFF


# The text of the byte-0xFF token: latin-1 for the byte tokenizer, and the byte-level BPE alphabet
# (GPT-2's printable mapping) writes byte 0xFF as the same character.
PREFIX_TEXT = bytes([PREFIX_BYTE]).decode("latin-1")


class GateLoopTokenizer(PreTrainedTokenizer):
    """kind="byte" (ids are UTF-8 bytes) or kind="bpe" (the run's BPE, saved as gateloop_bpe.json)."""

    vocab_files_names = {"bpe_file": BPE_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"  # batches for generate: a causal model continues from each row's last token

    def __init__(self, bpe_file: str | None = None, kind: str = "byte", **kwargs):
        kwargs.pop("tokenizer_file", None)  # transformers offers a fast tokenizer file; there is none
        if kind == "byte":
            self._gl = ByteTokenizer()
            self._id_to_token = [bytes([i]).decode("latin-1") for i in range(256)]
        elif kind == "bpe":
            if bpe_file is None:
                raise ValueError(f"a BPE GateLoopTokenizer needs its {BPE_FILE}")
            self._gl = BPETokenizer.load(bpe_file)  # validates the file
            raw = tokenizers.Tokenizer.from_file(os.fspath(bpe_file))
            self._id_to_token = [raw.id_to_token(i) for i in range(raw.get_vocab_size())]
        else:
            raise ValueError(f"unknown gateloop tokenizer kind {kind!r}: byte or bpe")
        self.kind = kind
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        if PREFIX_TEXT not in self._token_to_id:
            raise ValueError("the BPE has no token for byte 0xFF: it is not byte level")
        for name in ("bos_token", "eos_token", "pad_token"):
            kwargs.setdefault(name, PREFIX_TEXT)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(kind=kind, **kwargs)

    @property
    def prefix_token_id(self) -> int:
        """The id of byte 0xFF: 255 for bytes, its alphabet token's id in a BPE."""
        return self._token_to_id[PREFIX_TEXT]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._id_to_token[i] for i in self._gl.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[index]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])  # gateloop adds no special tokens

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self._gl.decode(ids)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._gl.decode([self._token_to_id[t] for t in tokens])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if self.kind == "byte":
            return ()
        path = Path(save_directory) / ((f"{filename_prefix}-" if filename_prefix else "") + BPE_FILE)
        self._gl.save(path)
        return (os.fspath(path),)
