"""Model surgery lives in lcompress.surgery (its behaviour is tested in test_nn.py); the old import path stays."""
import torch
from torch import nn

import lcompress.nn as lnn
from lcompress import surgery


def test_old_import_path_is_the_same_function():
    assert lnn.remove_dead_neurons is surgery.remove_dead_neurons and "remove_dead_neurons" in lnn.__all__


def test_module_slots_lists_every_place_of_a_shared_module():
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    slots = surgery._module_slots(net)
    assert [c for _, c in slots["0"]] == ["0", "2"] and "2" not in slots
    x = torch.randn(3, 2)
    assert torch.equal(net(x), shared(torch.relu(shared(x))))
