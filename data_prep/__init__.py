"""Data preparation: `megatron-mega prepare tokenizer | tokenize | merge | inspect` (see commands.py).

    sources.py          inputs (files, globs, folders, compression, `datasets`) in a fixed document order
    records.py          raw record -> text or a skip reason; the tally of skipped records with their locations
    train_tokenizer.py  SentencePiece unigram/BPE training on a seeded sample (megatron_mega.data.tokenizer loads it)
    tokenize.py         parallel, resumable, deterministic tokenizing into Megatron .bin/.idx shards + manifest.json
    merge.py            one manifest over the parts of a --num-jobs split (optionally resharded byte-identically)
    inspect_dataset.py  counts, lengths, token histogram, decoded samples, checksum verification
"""
