import json
import os
import signal
from dataclasses import dataclass

import pytest
import torch

from condense.errors import ConfigError, NonFiniteError
from condense.synth._matching import ImageOptimizerMixin, init_images, new_synthetic_set
from condense.synth.base import Synthesizer
from condense.synth.runner import Callback, RunConfig, RunInterrupted, run


class Toy(ImageOptimizerMixin, Synthesizer):
    """Pulls the images towards random real batches: uses the generator and momentum state."""

    name = "toy"
    resume_free_fields = ("iterations", "signal_at", "nan_at")

    @dataclass
    class Config:
        iterations: int = 6
        lr: float = 0.1
        nan_at: int = -1
        signal_at: int = -1

    def init_set(self):
        syn = new_synthetic_set(self.ctx, init_images(self.ctx, "noise"), self.name, {})
        self.make_image_optimizer(syn, self.cfg.lr, 0.5)
        return syn

    def step(self, syn, it):
        real = self.ctx.index.gather(self.ctx.data.train_images, 3, self.ctx.generator).mean(1)
        target = real.repeat_interleave(self.ctx.ipc, 0)
        loss = (syn.images - target).pow(2).mean()
        if it == self.cfg.nan_at:
            loss = loss * float("nan")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if it == self.cfg.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": loss.item()}

    def state_dict(self):
        return self.optimizer_state()

    def load_state_dict(self, state):
        self.load_optimizer_state(state)


def _toy(tiny_data, **cfg):
    from tests.conftest import make_ctx

    return Toy(Toy.Config(**cfg), make_ctx(tiny_data, seed=5))


def test_runs_all_iterations_and_logs(tiny_data, tmp_path):
    res = run(_toy(tiny_data), RunConfig(run_dir=tmp_path, progress=False))
    assert res.iterations_done == 6 and res.stopped_by == "iterations"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["it"] for x in lines] == [1, 2, 3, 4, 5, 6] and all("loss" in x for x in lines)
    assert not res.syn.images.requires_grad


def test_deadline_stops_cleanly(tiny_data, monkeypatch):
    import condense.synth.runner as runner

    clock = iter(range(0, 1000, 10))  # every perf_counter call advances 10 s
    monkeypatch.setattr(runner.time, "perf_counter", lambda: float(next(clock)))
    res = run(_toy(tiny_data, iterations=100), RunConfig(max_seconds=45, progress=False))
    assert res.stopped_by == "deadline" and 0 < res.iterations_done < 100
    assert res.info()["iterations_planned"] == 100


def test_deadline_is_not_overrun_by_a_long_iteration(tiny_data, monkeypatch):
    """Iterations of 30 s, budget 100 s: 3 iterations (90 s); a 4th would end at 120 s."""
    import condense.synth.runner as runner

    clock = {"t": 0.0}
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock["t"])
    res = run(_slow(tiny_data, monkeypatch, clock, 30.0), RunConfig(max_seconds=100, progress=False))
    assert (res.stopped_by, res.iterations_done, res.wall_s) == ("deadline", 3, 90.0)
    # a single iteration longer than the whole budget still runs once (nothing to judge it by)
    clock["t"] = 0.0
    res = run(_slow(tiny_data, monkeypatch, clock, 150.0), RunConfig(max_seconds=100, progress=False))
    assert (res.stopped_by, res.iterations_done) == ("deadline", 1)


def _slow(tiny_data, monkeypatch, clock, seconds):
    """A toy synthesizer whose every step advances the fake ``clock`` by ``seconds``."""
    toy = _toy(tiny_data, iterations=100)
    real_step = toy.step

    def slow_step(syn, it):
        clock["t"] += seconds
        return real_step(syn, it)

    monkeypatch.setattr(toy, "step", slow_step)
    return toy


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    full = run(_toy(tiny_data), RunConfig(run_dir=tmp_path / "a", ckpt_every=2, progress=False))
    # a run that got to iteration 4 (its checkpoint), then died
    part = _toy(tiny_data, iterations=4)
    run(part, RunConfig(run_dir=tmp_path / "b", ckpt_every=2, progress=False))
    resumed = run(_toy(tiny_data), RunConfig(run_dir=tmp_path / "b", ckpt_every=2, resume=True, progress=False))
    assert resumed.iterations_done == 6
    assert torch.equal(full.syn.images, resumed.syn.images)
    its = [json.loads(x)["it"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_checkpoint_of_another_config(tiny_data, tmp_path):
    """A checkpoint written with other settings is not silently continued under the new ones."""
    run(_toy(tiny_data, iterations=2), RunConfig(run_dir=tmp_path, ckpt_every=2, progress=False))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"another toy config \(lr: 0.1 -> 0.5\).*resume=false"):
        run(_toy(tiny_data, lr=0.5), RunConfig(run_dir=tmp_path, resume=True, progress=False))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # left as it was
    res = run(_toy(tiny_data, iterations=3), RunConfig(run_dir=tmp_path, resume=True, progress=False))
    assert res.iterations_done == 3  # iterations may change on resume


def test_nan_stops_with_iteration_and_keeps_checkpoint(tiny_data, tmp_path):
    with pytest.raises(NonFiniteError, match="iteration 4") as e:
        run(_toy(tiny_data, nan_at=3), RunConfig(run_dir=tmp_path, ckpt_every=2, progress=False))
    assert "checkpoint" in str(e.value)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 2 and torch.isfinite(state["images"]).all()


def test_signal_writes_checkpoint_and_resume_finishes(tiny_data, tmp_path):
    with pytest.raises(RunInterrupted) as e:
        run(_toy(tiny_data, signal_at=2), RunConfig(run_dir=tmp_path, progress=False))
    assert e.value.iteration == 3 and e.value.signum == signal.SIGTERM
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 3
    res = run(_toy(tiny_data), RunConfig(run_dir=tmp_path, resume=True, progress=False))
    full = run(_toy(tiny_data), RunConfig(run_dir=tmp_path / "x", progress=False))
    assert torch.equal(res.syn.images, full.syn.images)


def test_callbacks_observe(tiny_data):
    seen = []

    class Spy(Callback):
        def on_step(self, it, metrics, syn):
            seen.append(it)
            return {"extra": 1.0}

    run(_toy(tiny_data, iterations=3), RunConfig(progress=False, callbacks=[Spy()]))
    assert seen == [1, 2, 3]


def test_bad_run_config():
    with pytest.raises(ConfigError, match="max_seconds"):
        RunConfig(max_seconds=0)
    with pytest.raises(ConfigError, match="iterations"):
        RunConfig(iterations=-1)


def test_init_time_is_part_of_the_wall_time(tiny_data):
    """Building the starting set (e.g. herding's feature network) is distillation time."""
    import time

    class SlowInit(Toy):
        def init_set(self):
            time.sleep(0.3)
            return super().init_set()

    from tests.conftest import make_ctx

    res = run(SlowInit(Toy.Config(iterations=1), make_ctx(tiny_data, seed=5)), RunConfig(progress=False))
    assert res.init_s >= 0.3 and res.wall_s >= res.init_s and res.info()["init_s"] >= 0.3


def test_herding_init_is_the_herding_selection(tiny_data, tmp_path):
    from condense.synth.selection import INIT_FEATURES, Herding
    from tests.conftest import make_ctx

    images = init_images(make_ctx(tiny_data, ipc=2, cache_dir=tmp_path), "herding")
    picked = Herding(INIT_FEATURES, make_ctx(tiny_data, ipc=2, cache_dir=tmp_path)).init_set()
    assert images.shape == picked.images.shape and torch.equal(images, picked.images)
    with pytest.raises(ConfigError, match="valid choices: real, noise, herding, kmeans"):
        init_images(make_ctx(tiny_data), "kmeanz")
    # k-means representatives in the same feature network: one real image of the class per centre
    km = init_images(make_ctx(tiny_data, ipc=2, cache_dir=tmp_path), "kmeans")
    for i, c in enumerate([0, 0, 1, 1, 2, 2, 3, 3]):
        pool = tiny_data.train_images[tiny_data.train_labels == c]
        assert bool((pool - km[i]).flatten(1).abs().amax(1).eq(0).any())


class Preparing(Toy):
    """A toy whose ``prepare`` counts its calls and takes ``prepare_seconds`` on the fake clock."""

    calls = 0

    def __init__(self, cfg, ctx, clock=None, prepare_seconds=0.0):
        super().__init__(cfg, ctx)
        self.clock, self.prepare_seconds = clock, prepare_seconds

    def prepare(self):
        Preparing.calls += 1
        if self.clock is not None:
            self.clock["t"] += self.prepare_seconds


def _preparing(tiny_data, clock=None, prepare_seconds=0.0, **cfg):
    from tests.conftest import make_ctx

    Preparing.calls = 0
    return Preparing(Toy.Config(**cfg), make_ctx(tiny_data, seed=5), clock, prepare_seconds)


def test_prepare_runs_once_off_the_clock(tiny_data, monkeypatch):
    """prepare() takes 500 s of a 100 s budget: the 30 s iterations still get their 3 iterations."""
    import condense.synth.runner as runner

    clock = {"t": 0.0}
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock["t"])
    synth = _preparing(tiny_data, clock, 500.0, iterations=100)
    real_step = synth.step

    def slow_step(syn, it):
        clock["t"] += 30.0
        return real_step(syn, it)

    monkeypatch.setattr(synth, "step", slow_step)
    res = run(synth, RunConfig(max_seconds=100, progress=False))
    assert Preparing.calls == 1
    assert (res.stopped_by, res.iterations_done, res.wall_s, res.prepare_s) == ("deadline", 3, 90.0, 500.0)
    assert res.info()["prepare_s"] == 500.0 and res.info()["wall_s"] == 90.0


def test_prepare_time_is_reported_and_runs_again_on_resume(tiny_data, tmp_path):
    import time

    class Sleepy(Preparing):
        def prepare(self):
            super().prepare()
            time.sleep(0.2)

    from tests.conftest import make_ctx

    Preparing.calls = 0
    res = run(Sleepy(Toy.Config(iterations=2), make_ctx(tiny_data, seed=5)),
              RunConfig(run_dir=tmp_path, ckpt_every=1, progress=False))
    assert Preparing.calls == 1 and res.info()["prepare_s"] >= 0.2 and res.init_s < 0.2  # not init time
    res = run(Sleepy(Toy.Config(iterations=4), make_ctx(tiny_data, seed=5)),
              RunConfig(run_dir=tmp_path, ckpt_every=1, resume=True, progress=False))
    assert Preparing.calls == 2 and res.iterations_done == 4 and res.info()["prepare_s"] >= 0.2


def test_default_prepare_is_a_no_op(tiny_data):
    res = run(_toy(tiny_data, iterations=1), RunConfig(progress=False))
    assert res.info()["prepare_s"] < 0.05
