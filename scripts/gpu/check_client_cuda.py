"""The remote client's CUDA path against the in-process target, on a GPU.

    python scripts/gpu/check_client_cuda.py /tmp/tiny-peaked

Starts ``eagle3-target serve`` (HF engine, fp32, on cuda) and compares, for every mode,
what ``RemoteTarget(device="cuda")`` delivers (responses read into pinned buffers,
copied to the device without blocking) with ``generate_batch`` in process on the same
GPU. Prints the largest difference per field and exits 1 if any exceeds 1e-4.
"""

from __future__ import annotations

import sys

import torch

from eagle3_target import Eagle3TargetModel, VocabMapping, compute_target_distribution
from eagle3_target.client import RemoteTarget
from eagle3_target.server.process import ServerProcess


def main() -> int:
    model = sys.argv[1]
    target = Eagle3TargetModel.from_pretrained(model, device="cuda", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (3, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 11:] = 0
    loss = (torch.rand(ids.shape, generator=g) > 0.3).long() * mask
    ref = target.generate_batch(ids, mask, loss)
    mapping = VocabMapping.from_ids(torch.randperm(target.vocab_size, generator=g)[:64], target.vocab_size)
    probs, pmask = compute_target_distribution(ref.logits, mapping.selected_token_ids.cuda(),
                                               mapping.selected_token_mask.cuda(), ref.loss_mask)
    worst = 0.0
    with ServerProcess(["--model", model, "--device", "cuda", "--dtype", "float32"], token="t").start(300) as srv:
        for mode in ("logits", "draft", "hidden"):
            with RemoteTarget(srv.url, token="t", mode=mode, device="cuda", dtype="float32") as rt:
                if mode == "draft":
                    rt.set_vocab_mapping(mapping)
                got = rt.generate_batch(ids, mask, loss)
                want = {"aux_hidden_states": ref.aux_hidden_states, "input_ids": ref.input_ids,
                        "loss_mask": ref.loss_mask}
                want.update({"target_probs": probs, "position_mask": pmask} if mode == "draft"
                            else {"logits": ref.logits})
                for k, w in want.items():
                    v = getattr(got, k)
                    assert v.is_cuda, f"{mode} {k} not on the GPU"
                    d = (v.float() - w.to(v.device).float()).abs().max().item()
                    worst = max(worst, d)
                    print(f"{mode:7s} {k:18s} {tuple(v.shape)} max |remote - in-process| = {d:.3g}")
    ok = worst <= 1e-4
    print("OK" if ok else "MISMATCH", f"(worst {worst:.3g}) on {torch.cuda.get_device_name()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
