"""The learning-rate finder's verdicts (tools/lr_find.py)."""

from tests.conftest import ROOT
from tests.helpers import invoke


def test_lr_find_says_when_the_loss_never_beat_a_uniform_guess():
    res = invoke("lr-find", ROOT / "configs" / "quickstart.yaml")
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

    from cnnctl.tools.lr_find import RULES, suggest

    lrs = list(np.logspace(-6, 0, 100))
    losses = [2.3] * 20 + list(np.linspace(2.29, 0.5, 41)) + [0.6, 0.55] + list(np.linspace(0.7, 5, 37))
    lr = suggest(lrs, losses)
    assert lr == RULES["valley"](lrs, losses)
    end, length = 60, 42  # the longest decreasing run: 2.3 at step 19 down to 0.5 at step 60 (0.6 is higher)
    third = length / 3
    assert lr == lrs[end - length + int(third) + int(third / 2)]  # fastai's index, from end - length
    assert lrs[20] < lr < lrs[60]
    assert suggest(lrs[:2], losses[:2]) is None  # too short a curve


def test_the_terminal_chart_marks_the_suggested_rate():
    from cnnctl.tools.lr_find import lr_chart_series

    res = {"lrs": [1e-4, 1e-3, 1e-2, 1e-1], "losses": [2.0, 1.5, 1.0, 3.0], "suggested_lr": 1.1e-3}
    series = lr_chart_series(res)
    assert series["loss (smoothed)"] == res["losses"] and series["suggested 0.0011"] == [None, 1.5, None, None]
    text = invoke("lr-find", ROOT / "configs" / "quickstart.yaml", "--steps", "30").stdout
    assert "suggested" in text and "valley rule" in text
