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
