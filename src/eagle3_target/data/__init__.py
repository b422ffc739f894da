"""Chat data -> training rows.

- :mod:`.rows` - rows from JSONL and Parquet files, numbered globally; the bundled
  sample chats (``sample_chats.jsonl``: OpenAI messages, ``sample_sharegpt.jsonl``:
  ShareGPT conversations);
- :mod:`.chat` - a row -> messages -> ``input_ids`` + assistant-only ``loss_mask``
  (the chat encoder), and the accounting of skipped rows;
- :mod:`.tokenizer` - loading and fingerprinting a local tokenizer;
- :mod:`.draft_vocab` - a draft vocabulary from the supervised tokens of chat data.

No torch is imported by ``rows``, ``chat`` or ``tokenizer`` (the dump's render process
uses them).
"""
