"""Data: text corpora and their splits, tokenizers, and the unigram baseline.

The synthetic task generators (synthetic.py) are a separate module of this package.
"""

from .corpora import (
    BUILTIN_CORPORA,
    DEFAULT_CORPUS,
    Document,
    cache_dir,
    count_bytes,
    document_texts,
    encode_splits,
    load_corpus,
    load_hf_corpus,
    read_builtin_archive,
    split_documents,
    unigram_bits_per_byte,
)
from .tokenizer import (
    DEFAULT_BPE_VOCAB,
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

__all__ = [
    "BUILTIN_CORPORA",
    "DEFAULT_BPE_VOCAB",
    "DEFAULT_CORPUS",
    "TOKENIZER_FILE",
    "BPETokenizer",
    "ByteTokenizer",
    "Document",
    "Tokenizer",
    "build_tokenizer",
    "cache_dir",
    "count_bytes",
    "document_texts",
    "encode_splits",
    "load_corpus",
    "load_hf_corpus",
    "load_tokenizer",
    "read_builtin_archive",
    "save_tokenizer",
    "split_documents",
    "unigram_bits_per_byte",
]
