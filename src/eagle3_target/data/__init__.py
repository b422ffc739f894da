"""Data: chat files -> ``input_ids`` + assistant-only ``loss_mask`` (:mod:`.chat`) and the
sample chats shipped with the package (``sample_chats.jsonl``, ``sample_sharegpt.jsonl``)
and the built-in tiny model (:mod:`.tiny`)."""
