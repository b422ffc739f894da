"""Data helpers: the built-in tiny model and (later) chat data -> input_ids + loss_mask."""
