"""The learning-rate finder's verdicts (tools/lr_find.py)."""

from tests.conftest import ROOT
from tests.helpers import invoke


def test_lr_find_says_when_the_loss_never_beat_a_uniform_guess():
    res = invoke("lr-find", ROOT / "configs" / "quickstart.yaml", "--max-lr", "1e-4", "--steps", "40")
    assert "stayed above 1.39 (ln 4: a uniform guess over 4 classes)" in res.stdout
    assert "never diverged" not in res.stdout


def test_lr_find_verdicts_follow_the_curve():
    from cnnctl.tools.lr_find import verdict

    lrs = [10 ** (-7 + i / 10) for i in range(71)]
    rising = [2.0 - i / 100 for i in range(40)] + [1.6 + i / 50 for i in range(31)]
    notes = verdict({"losses": rising, "lrs": lrs, "stopped_early": False, "classes": 10, "chance_loss": 2.3}, 1.0)
    assert len(notes) == 1 and "rose from its minimum 1.6 at 0.001 to 2.2" in notes[0] and "do not help" in notes[0]
    notes = verdict({"losses": [3.0, 2.5, 2.4], "lrs": lrs[:3], "stopped_early": False, "classes": 4,
                     "chance_loss": 1.386}, 1.0)
    assert "stayed above 1.39" in notes[0] and "still at its lowest" in notes[1]


def test_the_valley_rule_takes_the_middle_of_the_longest_fall():
    """A flat start, a long steady fall over steps 20..60, a bump, then divergence: the valley rule suggests a
    rate inside the long fall (fastai's index: its start plus a third plus a sixth of its length), where the
    steepest-descent rule may pick the start of the drop."""
    import numpy as np

    from cnnctl.tools.lr_find import RULES

    lrs = list(np.logspace(-6, 0, 100))
    losses = [2.3] * 20 + list(np.linspace(2.29, 0.5, 41)) + [0.6, 0.55] + list(np.linspace(0.7, 5, 37))
    lr = RULES["valley"](lrs, losses)
    end, length = 60, 42  # the longest decreasing run: 2.3 at step 19 down to 0.5 at step 60 (0.6 is higher)
    third = length / 3
    assert lr == lrs[end - length + int(third) + int(third / 2)]  # fastai's index, from end - length
    assert lrs[20] < lr < lrs[60]
    assert RULES["valley"](lrs[:2], losses[:2]) is None  # too short a curve


def test_the_suggestion_is_the_lowest_point_for_sgd_and_a_tenth_of_it_for_adaptive_optimizers():
    import numpy as np

    from cnnctl.core import optim
    from cnnctl.tools.lr_find import suggest

    lrs = list(np.logspace(-6, 0, 61))
    losses = [2.0] * 30 + list(np.linspace(1.9, 0.8, 20)) + list(np.linspace(1.0, 3.0, 11))  # lowest at step 49
    assert suggest(lrs, losses) == lrs[49] and suggest(lrs, losses, adaptive=True) == lrs[49] / 10
    assert suggest(lrs, sorted(losses)) is None  # lowest at the first step: the loss never fell
    assert {name for name, cls in optim.OPTIMIZERS.items() if cls.adaptive} == {
        "adam", "adamw", "radam", "rmsprop", "adagrad", "adadelta"}


def test_the_curve_is_centred_so_it_does_not_lag_the_rate():
    """A drop at step 50: the centred average is halfway down at step 50 itself, where the running average
    (fastai's, beta 0.98) would still be near the old value."""
    import numpy as np

    from cnnctl.tools.lr_find import centred

    raw = [3.0] * 50 + [1.0] * 50
    curve = centred(raw)
    assert len(curve) == 100 and np.allclose([curve[0], curve[39], curve[60], curve[-1]], [3, 3, 1, 1])  # 21 wide
    assert abs(curve[50] - 2.0) < 0.15
    assert np.all(np.diff(curve) <= 0)


def test_the_terminal_chart_marks_the_suggested_rate():
    from cnnctl.tools.lr_find import lr_chart_series

    res = {"lrs": [1e-4, 1e-3, 1e-2, 1e-1], "losses": [2.0, 1.5, 1.0, 3.0], "suggested_lr": 1.1e-3}
    series = lr_chart_series(res)
    assert series["loss (smoothed)"] == res["losses"] and series["suggested 0.0011"] == [None, 1.5, None, None]
    text = invoke("lr-find", ROOT / "configs" / "quickstart.yaml", "--steps", "30").stdout
    assert "suggested" in text and "adaptive optimizers such as adam" in text  # quickstart trains with Adam
