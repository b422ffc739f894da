"""Eight trainer clients at once: every response matches its own request, and the
server really merged concurrent requests into shared engine calls (its metrics say so)."""

from __future__ import annotations

import threading

import httpx
import torch

from eagle3_target import build_vocab_mapping, compute_target_distribution
from eagle3_target.client import RemoteTarget
from server_helpers import make_inputs, metric

CLIENTS = 8
REQUESTS = 12
MODES = ("logits", "hidden", "draft", "logits")


def test_eight_clients_get_their_own_answers_from_merged_batches(server, token, reference):
    mapping = build_vocab_mapping(torch.arange(reference.vocab_size) % 97, 200)
    auth = {"Authorization": f"Bearer {token}"}
    before = httpx.get(server.url + "/metrics", headers=auth, trust_env=False, timeout=60).text
    results: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        mode = MODES[c % len(MODES)]
        try:
            with RemoteTarget(server.url, token=token, mode=mode, retries=0) as rt:
                if mode == "draft":
                    rt.set_vocab_mapping(mapping)
                if mode == "hidden":
                    rt.lm_head()
                start.wait()
                for i in range(REQUESTS):
                    rows, seq = 1 + (c + i) % 3, 8 + 5 * ((c * 7 + i) % 9)
                    inputs = make_inputs(1000 * c + i, rows, seq)
                    results[(c, i)] = (mode, inputs, rt.generate_batch(*inputs))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == CLIENTS * REQUESTS

    # Padding a request into a longer merged batch changes fp32 rounding slightly; a
    # result that reached the wrong request would differ by O(1).
    tol = dict(rtol=1e-4, atol=1e-4)
    for (c, i), (mode, inputs, got) in results.items():
        ref = reference.generate_batch(*inputs)
        assert got.aux_hidden_states.shape == ref.aux_hidden_states.shape
        torch.testing.assert_close(got.aux_hidden_states, ref.aux_hidden_states, **tol)
        assert torch.equal(got.input_ids, ref.input_ids)
        if mode == "draft":
            probs, pmask = compute_target_distribution(ref.logits, mapping.selected_token_ids,
                                                       mapping.selected_token_mask, ref.loss_mask)
            torch.testing.assert_close(got.target_probs, probs, **tol)
        else:
            torch.testing.assert_close(got.logits, ref.logits, **tol)

    after = httpx.get(server.url + "/metrics", headers=auth, trust_env=False, timeout=60).text
    d = lambda name, **kw: metric(after, name, **kw) - metric(before, name, **kw)  # noqa: E731
    calls = d("eagle3_engine_batch_requests_count")
    served = d("eagle3_engine_batch_requests_sum")
    assert served == CLIENTS * REQUESTS
    assert d("eagle3_engine_merged_requests_total") > 0, "no engine call merged two requests"
    assert calls < served, f"{calls} engine calls for {served} requests"
    print(f"{served:.0f} requests in {calls:.0f} engine calls; "
          f"{d('eagle3_engine_merged_requests_total'):.0f} shared a call")
