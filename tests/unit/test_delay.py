import pytest
import torch

from unimoe_ray.audio.delay import IGNORE_INDEX, DelayPattern

B, E, P = 1026, 1024, 1025


def test_worked_example_from_the_docstring():
    pat = DelayPattern((0, 2))
    codes = torch.tensor([[10, 11], [20, 21]])
    out = pat.apply(codes)
    assert out.tolist() == [[10, 11, E, P, P], [B, B, 20, 21, E]]
    assert pat.labels(out).tolist() == [
        [10, 11, E, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, IGNORE_INDEX, 20, 21, E],
    ]


def test_round_trip_release_pattern():
    pat = DelayPattern((0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18))
    codes = torch.randint(0, 1024, (12, 37))
    delayed = pat.apply(codes)
    assert delayed.shape == (12, 37 + 18 + 1)
    assert torch.equal(pat.revert(delayed), codes)
    assert torch.equal(pat.revert(pat.apply(codes[:, :0])), codes[:, :0])


def test_forced_tokens_follow_the_countdown():
    pat = DelayPattern((0, 2))
    assert [pat.forced_token(j, 1) for j in range(4)] == [None, None, E, P]
    assert [pat.forced_token(j, 0) for j in range(2)] == [E, P]


@pytest.mark.parametrize(
    "codes, match", [(torch.zeros(3, 4, dtype=torch.long), "2 codebooks"), (torch.full((2, 4), 1025), r"\[0, 1024\)")]
)
def test_bad_codes_are_named(codes, match):
    with pytest.raises(ValueError, match=match):
        DelayPattern((0, 2)).apply(codes)


def test_revert_rejects_specials_inside_the_frame_span():
    pat = DelayPattern((0, 2))
    bad = torch.tensor([[10, E, E, P, P], [B, B, 20, 21, E]])
    with pytest.raises(ValueError, match="bos/eos/pad"):
        pat.revert(bad)
