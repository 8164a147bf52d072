"""Streaming DAC decode (inference/streaming.py): chunks pushed a frame at a time, joined,
equal the whole-signal decode within float rounding, at 24 kHz and at the codec rate."""

import numpy as np
import pytest
import torch

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.inference.streaming import StreamingDecoder, context_frames, decode_whole


@pytest.fixture(scope="module")
def codec():
    return DACCodec.random(seed=0)


def test_context_covers_the_decoders_receptive_field(codec):
    # Random DAC: conv 7 (3 frames) + transposed x10 (1) + dilated units at 10 samples/frame
    # (3.9) + the later stages (< 2) -> 10 frames, +1.
    assert context_frames(codec) == 11


@pytest.mark.parametrize("out_rate", [24000, 16000])
def test_streamed_chunks_equal_the_whole_decode(codec, out_rate):
    g = torch.Generator().manual_seed(0)
    codes_KT = torch.randint(0, 1024, (12, 97), generator=g)
    whole = decode_whole(codec, codes_KT, out_rate)
    dec = StreamingDecoder(codec, out_rate=out_rate, first_chunk=3, chunk=10)
    chunks, first_at = [], None
    for t in range(codes_KT.shape[1]):
        due = dec.renders_after(1)  # the serving loop decodes on a thread only when a chunk is due
        new = dec.push(codes_KT[:, t : t + 1])
        assert due == bool(new), t
        if new and first_at is None:
            first_at = t + 1
        chunks += new
    chunks.append(dec.finish())
    assert first_at == 3 + dec.ctx + 1  # the first chunk leaves as soon as its context exists
    assert [len(c) for c in chunks[:3]] == [3 * dec.out_hop, 10 * dec.out_hop, 10 * dec.out_hop]
    streamed = np.concatenate(chunks)
    assert streamed.shape == whole.shape == (97 * codec.hop_length * out_rate // 16000,)
    # Joins: float rounding only (the receptive field is covered), against a peak of ~0.4.
    assert np.abs(streamed - whole).max() < 1e-4
    # Without context the joins are audibly wrong: the test can fail.
    bad = StreamingDecoder(codec, out_rate=out_rate, first_chunk=3, chunk=10, context=0)
    parts = [c for t in range(97) for c in bad.push(codes_KT[:, t : t + 1])] + [bad.finish()]
    assert np.abs(np.concatenate(parts) - whole).max() > 1e-2
