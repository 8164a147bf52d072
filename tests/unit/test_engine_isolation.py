"""One request can never harm another in the decode engine (inference/engine.py): admission is
all-or-nothing, every ending frees its slots (a property-based sequence of good, bad, cancelled,
failing and late requests), a row with NaN/inf logits fails alone while the others decode on bit
for bit, knobs that would fail deep in torch are refused where they are parsed, and the loop's
liveness check sees a wedged or inconsistent engine."""

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unimoe_ray.inference.engine import DecodeEngine, EngineInvariantError, EngineRequest
from unimoe_ray.inference.engine_loop import EngineLoop
from unimoe_ray.inference.sampling import SamplingConfig
from unimoe_ray.serve.runtime import sampling_overrides
from unimoe_ray.text.prompt import Prompt

NAN_TOKEN, VALUE_ERROR_TOKEN, RUNTIME_ERROR_TOKEN = 401, 402, 403  # prompt markers for the faulty model


class FaultyModel(torch.nn.Module):
    """The tiny model, but a prompt holding a marker token fails its prefill (ValueError or
    RuntimeError) or gets NaN logits. Prefills run one request at a time, so only that
    request sees the fault."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.cfg = model.cfg
        self.codec_head = model.codec_head

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, input_ids, *args, **kwargs):
        if bool((input_ids == VALUE_ERROR_TOKEN).any()):
            raise ValueError("the prompt holds a marker this model refuses")
        if bool((input_ids == RUNTIME_ERROR_TOKEN).any()):
            raise RuntimeError("simulated kernel failure")
        out = self.inner(input_ids, *args, **kwargs)
        if bool((input_ids == NAN_TOKEN).any()):
            out.codec_logits_BLKV.fill_(float("nan"))
        return out


def prompt(n: int, offset: int = 0, marker: int | None = None) -> Prompt:
    ids = torch.arange(offset, offset + n) % 300 + 10
    if marker is not None:
        ids[0] = marker
    return Prompt(ids)


def req(n=6, *, guided=True, frames=4, seed=5, marker=None, greedy=False, **knobs) -> EngineRequest:
    s = SamplingConfig(
        guidance_scale=1.5 if guided else 0.0, min_frames=0, max_frames=frames, seed=seed, greedy=greedy, **knobs
    )
    return EngineRequest(prompt(n, n, marker), prompt(3, 200) if guided else None, s)


def drain(engine: DecodeEngine, outputs: dict | None = None, limit: int = 500) -> dict:
    outputs = {} if outputs is None else outputs
    for _ in range(limit):
        if not engine.has_work():
            return outputs
        for out in engine.step():
            assert out.request_id not in outputs, "an output after the request ended"
            if out.done:
                outputs[out.request_id] = out
        engine.check_invariants()
    raise AssertionError("the engine did not drain")


def all_free(engine: DecodeEngine) -> bool:
    return engine.cache.free == engine.cache.rows and engine.running_rows == 0 and engine.num_running == 0


def test_knobs_refused_where_parsed():
    for bad, match in [
        (dict(seed=2**64), r"seed=.*\[0, 2\*\*63-1\]"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "integer"),
        (dict(temperature=1e-300), "normal float32"),
        (dict(temperature=float("nan")), "finite"),
        (dict(guidance_scale=float("inf")), "finite"),
        (dict(top_k=True), "integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**bad)
    assert SamplingConfig(seed=2**63 - 1).seed == 2**63 - 1
    # The API's temperature 0 is greedy decoding; 1e-300 (0 in float32) is refused, not divided by.
    assert sampling_overrides(temperature=0) == {"greedy": True}
    with pytest.raises(ValueError, match="normal float32"):
        sampling_overrides(temperature=1e-300)


def test_engine_check_refuses_ids_outside_the_vocabularies(tiny_model):
    engine = DecodeEngine(tiny_model, max_rows=4, max_len=128)
    vocab = tiny_model.cfg.vocab_size
    with pytest.raises(ValueError, match="token ids outside"):
        engine.submit(EngineRequest(Prompt(torch.tensor([5, vocab])), None, SamplingConfig(guidance_scale=0)))
    codes = torch.full((tiny_model.cfg.codec_channels, 2), 5000)
    with pytest.raises(ValueError, match="audio codes outside"):
        engine.submit(EngineRequest(Prompt(torch.tensor([5, 6]), codes), None, SamplingConfig(guidance_scale=0)))
    assert all_free(engine) and engine.num_waiting == 0


def test_a_failure_after_the_join_removes_the_rows(tiny_model):
    engine = DecodeEngine(tiny_model, max_rows=4, max_len=128)
    ok = engine.submit(req(5))
    engine.step()
    assert engine.running_rows == 2

    class Boom:  # the logits buffer refuses the new request's rows: after cache.join
        def __init__(self, inner):
            self.inner = inner

        def __getitem__(self, i):
            return self.inner[i]

        def __setitem__(self, i, v):
            raise RuntimeError("simulated failure after the join")

    real = engine._logits_RKV
    engine._logits_RKV = Boom(real)
    bad = engine.submit(req(7, seed=9))
    outs = {o.request_id: o for o in engine._admit()}
    engine._logits_RKV = real
    assert outs[bad].finish_reason == "error" and outs[bad].error_kind == "internal"
    assert engine.running_rows == 2 and [r.rid for r in engine._running] == [ok]
    engine.check_invariants()
    done = drain(engine)
    assert done[ok].finish_reason in ("eos", "length") and all_free(engine)


@pytest.mark.parametrize("fault", ["nan_logits", "knob_overflow"])
def test_a_row_that_cannot_be_sampled_fails_alone_others_bit_identical(tiny_model, fault):
    good = [req(6, seed=1, frames=6), req(9, guided=False, seed=2, frames=5), req(4, seed=3, frames=7)]
    if fault == "nan_logits":
        bad, kind, message = req(5, seed=4, marker=NAN_TOKEN), "internal", "non-finite logits"
    else:  # guidance × (cond − uncond) beyond float32, then ÷ temperature: +inf logits
        kind, message = "invalid", "overflowed"
        s = SamplingConfig(guidance_scale=3e38, temperature=1e-3, min_frames=0, max_frames=4, seed=4)
        bad = EngineRequest(prompt(5, 5), prompt(3, 200), s)
    model = FaultyModel(tiny_model)

    alone = DecodeEngine(model, max_rows=8, max_len=128)
    ids = [alone.submit(r) for r in good]
    expected = drain(alone)

    engine = DecodeEngine(model, max_rows=8, max_len=128)
    got_ids = [engine.submit(good[0]), engine.submit(bad), engine.submit(good[1]), engine.submit(good[2])]
    got = drain(engine)
    failed = got[got_ids[1]]
    assert failed.finish_reason == "error" and failed.error_kind == kind and message in failed.error
    for i, gid in zip(ids, [got_ids[0], got_ids[2], got_ids[3]]):
        assert torch.equal(got[gid].codes_KT, expected[i].codes_KT)  # sampled, bit for bit
    assert all_free(engine)


def test_a_row_failing_mid_decode_fails_alone(tiny_model):
    engine = DecodeEngine(tiny_model, max_rows=6, max_len=128)
    keep = [req(6, greedy=True, frames=20), req(8, greedy=True, frames=20, guided=False)]
    ids = [engine.submit(keep[0])]
    victim = engine.submit(req(7, frames=20, seed=3))
    ids.append(engine.submit(keep[1]))
    forward = engine._decode_forward
    calls = {"n": 0}

    def poisoned(frames):
        forward(frames)
        calls["n"] += 1
        if calls["n"] == 4:  # the victim's logits turn to NaN mid-decode
            (r,) = [r for r in engine._running if r.rid == victim]
            engine._logits_RKV[r.slots[0]] = float("nan")

    engine._decode_forward = poisoned
    got = drain(engine)
    assert got[victim].finish_reason == "error" and got[victim].error_kind == "internal"
    alone = DecodeEngine(tiny_model, max_rows=6, max_len=128)
    ref = [alone.run_to_completion([r])[0] for r in keep]
    for i, r in zip(ids, ref):
        assert torch.equal(got[i].codes_KT, r)  # greedy: equal though the batch shrank mid-way
    assert all_free(engine)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("good"), st.integers(1, 6), st.booleans(), st.booleans()),
        st.tuples(
            st.sampled_from(["value_error", "runtime_error", "nan", "too_long", "late"]),
            st.integers(1, 4),
            st.booleans(),
            st.booleans(),
        ),
        st.tuples(st.just("cancel"), st.integers(0, 20), st.booleans(), st.booleans()),
        st.tuples(st.just("step"), st.integers(1, 12), st.booleans(), st.booleans()),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_slots_all_free_after_any_sequence(tiny_model, ops):
    engine = DecodeEngine(FaultyModel(tiny_model), max_rows=4, max_len=96, max_waiting=6)
    submitted: list[int] = []
    outputs: dict = {}
    expect = {}
    for op, n, guided, greedy in ops:
        if op == "step":
            for _ in range(n):
                for out in engine.step():
                    assert out.request_id not in outputs, "an output after the request ended"
                    if out.done:
                        outputs[out.request_id] = out
                engine.check_invariants()
            continue
        if op == "cancel":
            if submitted:
                engine.cancel(submitted[n % len(submitted)])
            continue
        marker = {"value_error": VALUE_ERROR_TOKEN, "runtime_error": RUNTIME_ERROR_TOKEN, "nan": NAN_TOKEN}.get(op)
        r = req(4 + n, guided=guided, frames=n if op == "good" else 3, seed=n, marker=marker, greedy=greedy)
        if op == "too_long":
            r = req(200, guided=guided)
        if op == "late":
            r = EngineRequest(r.prompt, r.negative, r.sampling, timeout_s=1e-6)
        try:
            rid = engine.submit(r)
        except ValueError:
            assert op == "too_long"
            continue
        except RuntimeError:  # EngineFullError: the bounded queue
            assert engine.num_waiting >= engine.max_waiting
            continue
        assert op != "too_long"
        submitted.append(rid)
        expect[rid] = op
    drain(engine, outputs)
    assert all_free(engine) and engine.num_waiting == 0
    assert set(outputs) == set(submitted), "every request ends exactly once"
    for rid, op in expect.items():
        out = outputs[rid]
        if out.finish_reason == "cancelled":
            continue
        want = {
            "good": ("eos", "length"),
            "value_error": ("error",),
            "runtime_error": ("error",),
            "nan": ("error",),
            "late": ("timeout",),
        }[op]
        assert out.finish_reason in want, (op, out)
        if op == "value_error":
            assert out.error_kind == "invalid"
        if op in ("runtime_error", "nan"):
            assert out.error_kind == "internal"
    # ...and the engine still serves a normal request afterwards.
    (codes,) = engine.run_to_completion([req(5, greedy=True, frames=3)])
    assert codes.shape[1] >= 1 and all_free(engine)


def test_loop_survives_a_failing_step_and_reports_stalls_and_broken_accounting(tiny_model):
    engine = DecodeEngine(tiny_model, max_rows=4, max_len=128)
    loop = EngineLoop(engine)
    done = {}
    finished = threading.Event()

    def callback(out):
        if out.done:
            done[out.request_id] = out
            finished.set()

    try:
        # A step that fails outside any one row: its requests fail, the engine is reset and live.
        real_step = engine.step
        engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom: pid 1234 at 10.0.0.1"))
        rid = loop.submit(req(5), callback)
        assert finished.wait(30)
        assert done[rid].finish_reason == "error" and done[rid].error_kind == "internal"
        assert "pid" not in done[rid].error  # the exception's text stays out of the client's error
        assert all_free(engine) and loop.health(stall_s=60) is None
        engine.step = real_step

        # A wedged step: the liveness check sees it once it exceeds the stall limit.
        entered, release = threading.Event(), threading.Event()

        def wedged():
            entered.set()
            release.wait(30)
            return real_step()

        engine.step = wedged
        finished.clear()
        rid = loop.submit(req(5, frames=2), callback)
        assert entered.wait(30)
        deadline = time.monotonic() + 30
        while loop.health(stall_s=0.05) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "no step" in (loop.health(stall_s=0.05) or "")
        engine.step = real_step
        release.set()
        assert finished.wait(60) and done[rid].finish_reason in ("eos", "length")

        # Inconsistent slot accounting: check_invariants fails, the loop resets the engine and the
        # liveness check keeps failing (Serve replaces the replica).
        finished.clear()
        engine.cache.n += 1
        with pytest.raises(EngineInvariantError):
            engine.check_invariants()
        rid = loop.submit(req(5, frames=2), callback)
        assert finished.wait(30)
        assert "slot accounting" in (loop.health(stall_s=60) or "")
    finally:
        loop.stop()
