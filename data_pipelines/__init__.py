"""Audio corpora -> RVQ-token shards, and Grain pipelines that build and pack training sequences.

Modules: `shards` (record format, writer, reader, CLI), `tokenize` (manifest -> shards),
`demo_corpus` (eSpeak NG speech), `text_tokenizer`, `sequences` (task formats), `packing`
(rows, targets, loss weights), `pipeline` (Grain datasets), `config` (the `data` config section).
"""
