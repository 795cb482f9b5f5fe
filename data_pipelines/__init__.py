"""Audio corpora -> RVQ-token shards, and Grain pipelines that build and pack training sequences.

Modules: `shards` (record format, writer, reader, CLI), `tokenize` (manifest -> shards),
`demo_corpus` (eSpeak NG speech), `text_tokenizer`, `sequences` (task formats), `conversations`
(the chat formats of fine-tuning: manifest lines, records, sequences), `packing` (rows, targets,
loss weights), `pipeline` (Grain datasets), `config` (the `data` config section), `voice` (one
voice's recordings -> TTS shards), `waveforms` (waveform crops and transcripts for tokenizer
training).
"""
