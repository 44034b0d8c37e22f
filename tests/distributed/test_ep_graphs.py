"""EP under device graphs: the design (ascend_graph/distributed/ep.py, "Graph capture") is
the static path inside the captured graph, not a split at the EP op. Its precondition is
one token count on every EP rank; run outside capture (``static_shapes=True``) the static
path checks it on every rank at once, which this test shows on real processes. (Inside
a capture or replay nothing can check it: see ep.py on who must pad the ranks.)"""

from . import tp_workers
from .spawn import run_ranks


def test_static_path_with_different_buckets_raises_on_every_rank(tmp_path):
    results = run_ranks(tp_workers.static_path_needs_one_bucket, 2, tmp_path, timeout=120)
    for rank, res in enumerate(results):
        assert "trace" not in res, res.get("trace")
        r = res["static"]
        assert r["error"] == "DistributedError", (rank, r)
        assert r["expected"] == "every rank padded to one bucket size" and r["got"] == "tokens per rank: [5, 7]", (rank, r)
        assert r["seconds"] < 20  # raised after the header exchange, no collective left waiting
