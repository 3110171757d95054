"""MicroBatchSampler: a run's micro-batches from any point on, each process's share, one size per batch."""

from conjure.data.dataset import MicroBatchSampler, epoch_batches

SIZES = [(64, 64)] * 5 + [(64, 96)] * 4  # two buckets


def batches(start, end, *, rank=0, world=1, batch=2, seed=3):
    return list(MicroBatchSampler(SIZES, batch, seed, start, end, rank, world))


def test_a_sampler_started_later_yields_the_rest_of_the_same_sequence():
    """What makes a resume exact on the data side: micro-batch k is the same whether the run started at 0 or k."""
    whole = batches(0, 17)
    assert len(whole) == len(MicroBatchSampler(SIZES, 2, 3, 0, 17, 0, 1)) == 17
    assert batches(6, 17) == whole[6:]
    assert batches(11, 13) == whole[11:13]


def test_epochs_follow_each_other_and_each_visits_every_example_once():
    per_epoch = len(epoch_batches(SIZES, 2, 3, 0))
    run = batches(0, 2 * per_epoch)
    for epoch in (0, 1):
        keys = [key for b in run[epoch * per_epoch : (epoch + 1) * per_epoch] for key in b]
        assert {e for e, _ in keys} == {epoch}
        assert sorted(i for _, i in keys) == list(range(len(SIZES)))
    assert all(len({SIZES[i] for _, i in b}) == 1 for b in run)  # a batch never mixes sizes


def test_processes_share_each_batch():
    """Two processes take alternate items of the same global batch (size batch * world); a process whose share
    would be empty gets the batch's first item, so every process steps together."""
    chunks = epoch_batches(SIZES, 4, 3, 0)  # the first epoch's global batches
    assert any(len(chunk) == 1 for chunk in chunks)  # the odd one out of the five squares
    whole = batches(0, len(chunks), world=2)
    other = batches(0, len(chunks), rank=1, world=2)
    for m, (mine, theirs) in enumerate(zip(whole, other)):
        chunk = chunks[m]
        assert [i for _, i in mine] == chunk[0::2]
        assert [i for _, i in theirs] == (chunk[1::2] or chunk[:1])
