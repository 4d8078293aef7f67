"""The malloc policy a training process sets (cnnctl.core.allocator): a step after the first faults in no new pages
(glibc's default gave the same arrays fresh pages every step). Each case runs in a process of its own: the policy
is the process's."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is glibc's malloc's")

STEPS = """
import json, resource, sys
import numpy as np
from cnnctl.core import allocator, nn, parallel
from cnnctl.core.optim import OPTIMIZERS
from cnnctl.core.plan import Runner
if sys.argv[1] == "glibc":
    allocator._kept = False  # as if set already: malloc stays as glibc made it
parallel.use(2)
rng = np.random.default_rng(0)
model = nn.Model([nn.Conv2D(3, 16, 3, padding=1, activation="relu", rng=rng), nn.BatchNorm2D(16, activation="relu"),
                  nn.MaxPool2D(2), nn.Flatten(), nn.Dense(16 * 32 * 32, 10, rng=rng)])
runner, opt = Runner(model), OPTIMIZERS["sgd"](model, lr=0.01, momentum=0.9)
x = rng.standard_normal((32, 3, 64, 64)).astype(np.float32)
faults = []
for k in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = runner.forward(x)
    runner.backward(np.ones_like(out) / out.size)
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "kept": allocator._kept}))
"""


def steps(policy: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, policy], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return json.loads(out)


def test_a_training_step_after_the_first_faults_in_no_new_pages():
    """Its activations (8 MB a convolution output), gradients and temporaries come from memory the step before
    freed: a few faults a step once the heap has grown to the step's size (measured over twelve steps: 5,800, 1,030,
    20-340, then 0-1 a step, one step of 88 when a helper thread's arena grew late), where glibc's default faulted
    in 480-1,520 pages nearly every step (its median asserted above 200, so that the comparison shows the policy's
    effect, not a quiet allocator). Bounded on the median step and on the total after the fourth, not on each."""
    kept, default = steps("kept"), steps("glibc")
    assert kept["kept"] is True
    later, later_default = kept["faults"][4:], default["faults"][4:]
    assert sorted(later)[len(later) // 2] <= 16, kept
    assert sum(later) <= 0.05 * sum(later_default), (kept, default)
    assert sorted(later_default)[len(later_default) // 2] > 200, default


def test_a_policy_the_user_set_is_left_alone():
    """glibc's own variables in the environment: cnnctl sets nothing."""
    assert steps("kept", MALLOC_TRIM_THRESHOLD_="1000000")["kept"] is False


def test_training_from_python_sets_it_too():
    """cnnctl.train from a script never calls parallel.use: its training step sets the policy."""
    code = ("import numpy as np\nfrom cnnctl.core import allocator, nn\nfrom cnnctl.core.optim import OPTIMIZERS\n"
            "from cnnctl.core.plan import Runner\nfrom cnnctl.run.step import TrainingStep\n"
            "model = nn.Model([nn.Flatten(), nn.Dense(4, 2, rng=np.random.default_rng(0))])\n"
            "assert allocator._kept is None\n"
            "TrainingStep(Runner(model), nn.CrossEntropyLoss(), OPTIMIZERS['sgd'](model, lr=0.1))\n"
            "print(allocator._kept)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
