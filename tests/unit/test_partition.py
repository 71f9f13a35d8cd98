"""distnn.parallel.row_range: every global row on exactly one rank, contiguous and balanced."""

import pytest

from distnn.parallel import row_range


@pytest.mark.parametrize("size", range(1, 10))
def test_every_row_once_contiguous_and_balanced(size):
    for rows in range(0, 30):
        ranges = [row_range(rows, size, rank) for rank in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(hi == lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))  # contiguous
        counts = [hi - lo for lo, hi in ranges]
        assert max(counts) - min(counts) <= 1
        assert counts == sorted(counts, reverse=True)  # the extra rows go to the first ranks


def test_a_batch_smaller_than_the_rank_count_leaves_ranks_empty():
    assert [row_range(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
