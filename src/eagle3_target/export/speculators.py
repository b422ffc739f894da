"""Our dump as vllm-project/speculators' offline training data (speculators 0.9.0,
``speculators.train.data.ArrowDataset`` over ``hs_connectors.FileTransfer``).

Layout of an export folder ``OUT`` (``--data-path OUT``; ``--hidden-states-path`` is
``OUT/hidden_states``, the trainer's default)::

    data-00000-of-00001.arrow, dataset_info.json, state.json   ``datasets`` save_to_disk
    hidden_states/hs_{i}.safetensors                            one per sample i
    d2t.npy, t2d.npy                                            with --vocab only (id order)
    eagle3-export.json                                          our sidecar (sha256 of all)

The dataset has, per sample (in the dump's sample order), ``input_ids`` and ``loss_mask``
(int64, unshifted, as rendered: the mask marks the tokens to learn) and ``seq_len``, in
torch format as speculators' preprocessing saves it. ``hs_{i}`` holds ``token_ids [S]
int64`` (the sample's ``input_ids``; the reader drops a sample whose ids differ) and
``hidden_states [S,4,H]`` in the dump's dtype: the three aux layers in our order, then
the final state **before** the final norm (the dump's ``final_prenorm``). The trainer
shifts (``shift_batch``: aux at ``t`` with token ``t+1``) and computes its targets as
``lm_head(norm(final))``; giving it the post-norm state would apply the norm twice.

Layer ids: speculators (vLLM) numbers a state by the layers run before it, "after k
layers", so our aux id ``k`` (the output of decoder layer ``k``) is its ``k + 1``: our
default ``[1, N//2-1, N-4]`` is its default ``[2, N//2, N-3]``. The sidecar records both.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
import torch

from eagle3_target.export.files import ExportFiles, ExportSummary, dump_identity
from eagle3_target.export.source import DumpSource

__all__ = ["export_speculators", "hs_name", "vllm_layer_ids", "speculators_vocab"]

_DATASET_FILES = ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")  # state.json last


def hs_name(i: int) -> str:
    """Sample ``i``'s hidden-states file, as ``FileTransfer.get_cached(i)`` opens it."""
    return f"hidden_states/hs_{i}.safetensors"


def speculators_vocab(mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d2t [Vd] int64, t2d [V] bool)`` as speculators builds them: the draft ids are the
    selected target ids **in id order** (its trainer slices its LM head with the ``t2d``
    mask, which keeps id order), ``target = draft + d2t[draft]``. Our mapping keeps its
    own order (specials first, then by count), so its ``d2t`` is not this one."""
    ids = torch.sort(mapping.selected_token_ids).values
    return ids - torch.arange(ids.numel(), dtype=torch.int64), mapping.selected_token_mask.clone()


def vllm_layer_ids(aux_layer_ids: list[int]) -> list[int]:
    """Our aux ids in vLLM's "after k layers" numbering (``k + 1``)."""
    return [int(k) + 1 for k in aux_layer_ids]


def export_speculators(dump: str | Path, out: str | Path, *, vocab: str | None = None,
                       model: str | None = None, trust_existing: bool = False) -> ExportSummary:
    """Writes (or resumes, or repairs) the speculators export of ``dump`` into ``out``.

    The dump must hold ``final_prenorm`` (``dump --with-prenorm``), or ``model`` (the
    dump's model folder) recomputes it sample by sample. ``vocab``: a draft vocabulary
    (``eagle3-target vocab``) written as the trainer's ``d2t.npy``/``t2d.npy``. Raises
    ValueError before writing anything on bad input.
    """
    t0 = time.perf_counter()
    src = DumpSource(dump, model=model, need_prenorm=True, vocab=vocab)
    cfg = src.config
    settings = {"dtype": cfg["dtype"], "vocab_mapping_id": src.mapping.mapping_id if src.mapping else None,
                "prenorm": "stored" if src.prenorm_stored else "recomputed",
                "aux_layer_ids": cfg["aux_layer_ids"], "vllm_layer_ids": vllm_layer_ids(cfg["aux_layer_ids"])}
    files = ExportFiles(out, to="speculators", source=dump_identity(dump), settings=settings,
                        trust_existing=trust_existing)
    try:
        n = len(src)
        lengths = [src.length(i) for i in range(n)]
        for i in range(n):
            if files.done(hs_name(i)):
                continue
            raw = src.sample(i, ("input_ids", "aux_hidden_states", "final_prenorm"), prenorm=True)
            s, h = raw["input_ids"].shape[0], cfg["hidden_size"]
            # [S,3H] aux then [S,H] pre-norm -> [S,4,H]: the trainer splits [:, :-1] and [:, -1]
            hs = torch.cat((raw["aux_hidden_states"].reshape(s, 3, h), raw["final_prenorm"].reshape(s, 1, h)), 1)
            files.write_tensors(hs_name(i), {"token_ids": raw["input_ids"].to(torch.int64), "hidden_states": hs})
        if src.mapping is not None:
            import numpy as np

            for name, t in zip(("d2t.npy", "t2d.npy"), speculators_vocab(src.mapping)):
                if not files.done(name):
                    buf = io.BytesIO()
                    np.save(buf, t.numpy())
                    files.write_bytes(name, buf.getvalue())
        if not all(files.done(name) for name in _DATASET_FILES):
            _write_dataset(files, src)
        files.finish()
    finally:
        files.close()
        src.close()
    return files.summary(n, sum(lengths), time.perf_counter() - t0)


def _write_dataset(files: ExportFiles, src: DumpSource) -> None:
    """The ``datasets`` folder: built as one Arrow table from flat arrays (no Python
    list per token), saved into a temporary folder and moved into place file by file,
    ``state.json`` (what ``load_from_disk`` recognises a dataset by) last."""
    import os
    import shutil

    import datasets
    import numpy as np
    import pyarrow as pa

    ids, masks, lens = [], [], []
    for i in range(len(src)):
        raw = src.sample(i, ("input_ids", "loss_mask"))
        ids.append(raw["input_ids"].to(torch.int64).numpy())
        masks.append(raw["loss_mask"].to(torch.int64).numpy())
        lens.append(ids[-1].shape[0])
    offsets = pa.array(np.concatenate(([0], np.cumsum(lens))).astype(np.int32))
    table = pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(ids))),
        "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(masks))),
        "seq_len": pa.array(np.asarray(lens, dtype=np.int64)),
    })
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "loss_mask": datasets.Sequence(datasets.Value("int64")),
                                  "seq_len": datasets.Value("int64")})
    # A fingerprint of the contents, not a random one: a rerun writes the same state.json.
    fingerprint = files.record["source"][0]["sha256"][:16] if files.record["source"] else "0" * 16
    ds = datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features),
                          fingerprint=fingerprint)
    ds.set_format("torch")
    tmp = files.out / ".tmp-export-dataset"
    if tmp.exists():
        shutil.rmtree(tmp)
    datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(tmp))
    finally:
        datasets.enable_progress_bars()
    made = sorted(p.name for p in tmp.iterdir())
    if made != sorted(_DATASET_FILES):
        raise RuntimeError(f"datasets wrote {made}, expected {sorted(_DATASET_FILES)}")
    for name in _DATASET_FILES:
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp / name, files.out / name)
        files.adopt(name)
    tmp.rmdir()
