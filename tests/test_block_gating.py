"""Block-level gating (`group_size="all"`, `--gate-granularity block`): one gate
per residual branch, the coarse baseline the paper compares against."""

import keras
import numpy as np
import pytest

import bs_keras
from bs_keras import macs, models, recipes
from bs_keras.gates import find_gates
from tests.test_macs import _force, hand_cifar_resnet


@pytest.fixture(scope="module")
def block_resnet20():
    keras.backend.clear_session()
    return models.cifar_resnet(20, gated=True, seed=0, gate_kwargs={"group_size": "all"})


def test_one_gate_per_block(block_resnet20):
    gates = find_gates(block_resnet20)
    assert len(gates) == 9
    assert [g.num_gates for g in gates] == [1] * 9
    assert [g.group_size for g in gates] == [16] * 3 + [32] * 3 + [64] * 3
    # gate MLP: pool -> 16 -> 1 instead of 16 -> C
    _, hand, _ = hand_cifar_resnet(20)
    mlp = sum(c_in * 16 + 16 for c_in in [16] * 4 + [32] * 3 + [64] * 2)
    assert macs.count_macs(block_resnet20) == hand + mlp


def test_closed_block_gate_removes_both_branch_convs(block_resnet20):
    gates = find_gates(block_resnet20)
    _, hand, block_convs = hand_cifar_resnet(20)
    static = macs.count_macs(block_resnet20)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    for g in gates:
        _force(g, [10.0])
    _force(gates[4], [-10.0])  # stage2_block2 closed
    got = macs.conditional_macs(block_resnet20, x)
    np.testing.assert_array_equal(got, np.full(2, static - block_convs[4], np.float64))
    # a closed branch contributes only its second BN's constant shift
    with bs_keras.record_gates() as record:
        block_resnet20(x, training=False)
    assert np.asarray(record[gates[4]][0]).tolist() == [[0.0], [0.0]]
    probe = keras.Model(block_resnet20.input, block_resnet20.get_layer("stage2_block2_conv2").output)
    np.testing.assert_array_equal(np.asarray(probe(x, training=False)), 0.0)


def test_block_gate_config_round_trip(block_resnet20, tmp_path):
    gate = find_gates(block_resnet20)[0]
    assert gate.get_config()["group_size"] == "all"
    path = str(tmp_path / "m.keras")
    block_resnet20.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x, training=False), block_resnet20(x, training=False), atol=1e-6)
    assert [g.num_gates for g in find_gates(loaded)] == [1] * 9


@pytest.mark.parametrize("bad", ["block", 0, 2.5, "2"])
def test_bad_group_size_named(bad):
    with pytest.raises(ValueError, match="group_size must be a positive integer or 'all'"):
        bs_keras.ChannelGate(group_size=bad)


def test_recipe_granularity():
    r = recipes.get_recipe("fashion_mnist_sweep")
    assert r.gate_group_size == 1
    assert r.replace(gate_granularity="block").validate().gate_group_size == "all"
    with pytest.raises(ValueError, match="--gate-granularity='layer' is invalid"):
        r.replace(gate_granularity="layer").validate()
    with pytest.raises(ValueError, match="--group-size=2 is invalid"):
        r.replace(gate_granularity="block", group_size=2).validate()
