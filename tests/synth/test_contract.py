"""The contract every registered synthesizer keeps, run through ``condense.distil`` on real
Fashion-MNIST under ``budget=smoke`` (a future method gets these tests by registering):

- its artifact saves and loads (checksums, shapes, class-major order, metadata);
- one seed gives byte-identical ``synset.safetensors`` twice;
- interrupted by SIGINT mid-run (the runner checkpoints and raises ``RunInterrupted``), then
  resumed in the same run directory, it ends with the bytes of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

import pytest

import condense
from condense.api import compose
from condense.artifacts import load_synset
from condense.config import validate
from condense.synth import SYNTHESIZERS
from condense.synth.runner import CKPT_NAME, Callback, RunInterrupted
from tests.conftest import needs_fmnist

METHODS = SYNTHESIZERS.names()
ITERATIONS = 4  # smoke: a checkpoint every 2 iterations; the interrupt lands between two (at 3)
INTERRUPT_AT = 3


def _distil(tmp_path, method: str, run: str, **kw):
    return condense.distil(
        method=method, dataset="fashion_mnist", ipc=1, budget="smoke", run_dir=tmp_path / run, seed=0,
        evaluate=False, progress=False, iterations=ITERATIONS, cache_dir=str(tmp_path / "cache"),
        **{"budget.max_seconds": None, "model.kwargs.width": 16}, **kw)


class InterruptAt(Callback):
    """Sends SIGINT to this process after iteration ``k`` (as Ctrl-C would)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_step(self, it, metrics, syn):
        if it == self.k:
            os.kill(os.getpid(), signal.SIGINT)
        return None


class Steps(Callback):
    """Records where a run started and which iterations it ran."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.steps: list[int] = []

    def on_start(self, syn, start_it):
        self.start = start_it

    def on_step(self, it, metrics, syn):
        self.steps.append(it)
        return None


def test_every_registered_method_has_a_config():
    from condense.cli.main import group_choices

    assert len(METHODS) >= 7 and set(METHODS) <= set(group_choices("method"))


@needs_fmnist
@pytest.mark.parametrize("method", METHODS)
def test_artifact_loads_and_one_seed_gives_identical_bytes(tmp_path, method):
    a = _distil(tmp_path, method, "a")
    syn = load_synset(a.run_dir)
    spec = syn.meta.dataset
    assert syn.images.shape == (spec.num_classes, spec.channels, *spec.im_size)
    assert syn.meta.method == method and syn.meta.ipc == 1 and syn.meta.seed == 0
    assert syn.labels.shape[0] == spec.num_classes
    if not syn.soft:
        assert syn.labels.tolist() == list(range(spec.num_classes))  # class-major
    assert a.record["distill"]["iterations"] == a.record["distill"]["iterations_planned"]
    b = _distil(tmp_path, method, "b")
    assert (b.run_dir / "synset.safetensors").read_bytes() == (a.run_dir / "synset.safetensors").read_bytes()


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resume_after_an_interrupt_gives_the_uninterrupted_bytes(tmp_path, method):
    cfg, _ = compose(method, "fashion_mnist", 1, "smoke", iterations=ITERATIONS)
    if validate(cfg).iterations == 0:
        pytest.skip(f"{method} selects its set in one pass (0 iterations): there is no run to interrupt")
    full = _distil(tmp_path, method, "full")
    assert full.record["distill"]["iterations"] == ITERATIONS
    with pytest.raises(RunInterrupted) as e:
        _distil(tmp_path, method, "cut", callbacks=[InterruptAt(INTERRUPT_AT)])
    assert e.value.signum == signal.SIGINT and e.value.iteration == INTERRUPT_AT
    run_dir = tmp_path / "cut"
    assert (run_dir / CKPT_NAME).exists() and not (run_dir / "synset.safetensors").exists()
    steps = Steps()
    resumed = _distil(tmp_path, method, "cut", resume=True, callbacks=[steps])
    assert resumed.record["distill"]["iterations"] == ITERATIONS
    assert steps.start == INTERRUPT_AT and steps.steps == list(range(INTERRUPT_AT + 1, ITERATIONS + 1))
    assert (run_dir / "synset.safetensors").read_bytes() == (full.run_dir / "synset.safetensors").read_bytes()


MULTI = [m for m in METHODS if "multi" in SYNTHESIZERS.get(m).params]
#: Cheap enough for the default run; the others (experts to train) run with the slow tests.
MULTI_FAST = ("dm", "dc")


def test_every_matcher_composes_with_multi_formation():
    assert {"dc", "dsa", "dm", "datadam", "mtt", "tesla", "ftd", "datm"} <= set(MULTI)


@needs_fmnist
@pytest.mark.parametrize("method", [m if m in MULTI_FAST else pytest.param(m, marks=pytest.mark.slow) for m in MULTI])
def test_multi_formation_artifact_holds_slots_and_decodes(tmp_path, method):
    from condense.ops.formation import Decoder, decoded_set, set_decoder

    a = _distil(tmp_path, method, "a", param="multi", **{"param.factor": 2})
    syn = load_synset(a.run_dir)
    spec = syn.meta.dataset
    assert syn.images.shape == (spec.num_classes, spec.channels, *spec.im_size)  # one stored slot per class
    assert set_decoder(syn) == Decoder("multi", 2)
    assert a.record["variant"] == "multi2" and a.record["images"] == {"stored": 10, "decoded": 40}
    assert a.run_dir.name == "a" and decoded_set(syn).images.shape[0] == 40
    b = _distil(tmp_path, method, "b", param="multi", **{"param.factor": 2})
    assert (b.run_dir / "synset.safetensors").read_bytes() == (a.run_dir / "synset.safetensors").read_bytes()
