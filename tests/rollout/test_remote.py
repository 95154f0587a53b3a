"""The pure parts of disaggregated rollouts: bucket packing, batch merging and splitting, placement rules.

The processes themselves (learner and rollout ranks under torchrun) are tested in tests/distributed/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rollout import RolloutBatch, RolloutConfig, Sample
from posttrain.rollout.batches import merge_batches as _merge
from posttrain.rollout.batches import shares as _shares
from posttrain.rollout.batches import split_batch as _split
from posttrain.rollout.layout import check_layout
from posttrain.rollout.remote import _pack, _unpack


def test_pack_round_trips_mixed_dtypes_and_shapes_without_copies():
    bucket = [("a.weight", torch.randn(3, 5)), ("b.bias", torch.arange(7, dtype=torch.bfloat16)),
              ("c.scale", torch.tensor(2.5, dtype=torch.float64)), ("d.weight", torch.randn(4, 2).t())]
    header, flat = _pack(bucket)
    assert flat.dtype == torch.uint8 and all(start % 16 == 0 for *_, start in header)
    out = list(_unpack(header, flat))
    assert [name for name, _ in out] == [name for name, _ in bucket]
    for (_, got), (_, want) in zip(out, bucket):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # views into the buffer


def _batch(groups: int, n: int, tag: str) -> RolloutBatch:
    samples = [Sample(group=g, index=i, prompt_ids=[g], completion_ids=[i], text=f"{tag}{g}.{i}", logprobs=[0.0],
                      finish_reason="stop") for g in range(groups) for i in range(n)]
    return RolloutBatch(samples, num_prompts=groups, n=n, seconds=1.0)


def test_merge_then_split_renumbers_groups():
    merged = _merge([_batch(3, 2, "x"), _batch(0, 2, "y"), _batch(2, 2, "z")], n=2)
    assert merged.num_prompts == 5 and [s.group for s in merged] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [s.text for s in merged.groups()[3]] == ["z0.0", "z0.1"]
    first, second = _split(merged, [2, 3])
    assert first.num_prompts == 2 and [s.text for s in first] == ["x0.0", "x0.1", "x1.0", "x1.1"]
    assert [s.group for s in second] == [0, 0, 1, 1, 2, 2] and second.samples[0].text == "x2.0"


def test_shares_are_contiguous_and_balanced():
    assert _shares(7, 3) == [3, 2, 2] and _shares(2, 3) == [1, 1, 0] and sum(_shares(64, 5)) == 64


def test_placement_rules():
    colocated = RolloutConfig()
    assert colocated.rollout_ranks == 0 and colocated.learner_ranks(1) == 1
    split = RolloutConfig(placement="disaggregated", ranks=2)
    assert split.rollout_ranks == 2 and split.learner_ranks(5) == 3
    with pytest.raises(ConfigError, match="at least 2 processes"):
        RolloutConfig(placement="disaggregated").learner_ranks(1)
    with pytest.raises(ConfigError, match=r"rollout.ranks \(2\) .* at least one learner rank"):
        split.learner_ranks(2)
    # Disaggregated engines may shard over several rollout ranks now; the layout check rejects an odd split.
    RolloutConfig(placement="disaggregated", ranks=2, tensor_parallel_size=2).validate()
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size \(2\) .* must divide rollout.ranks \(3\)"):
        check_layout(RolloutConfig(placement="disaggregated", ranks=3, tensor_parallel_size=2), None, 5)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        RolloutConfig(tensor_parallel_size=0).validate()
    with pytest.raises(ConfigError, match="rollout.timeout"):
        RolloutConfig(timeout=0).validate()


def test_orphaned_shard_shared_memory_is_removed_but_live_mappings_are_kept(tmp_path):
    import mmap

    from posttrain.rollout.cpu_shm import remove_orphaned

    orphan, live, other = tmp_path / "-tp:0-[0-1]-cpushm_0", tmp_path / "-tp:0-[0-1]-cpushm_1", tmp_path / "keep"
    for path in (orphan, live, other):
        path.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):  # a shard still running maps its file
        assert remove_orphaned(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and other.exists()
