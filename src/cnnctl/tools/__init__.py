"""What is done with a trained model or around training: sweeps, the HTML report, explanations,
predictions, bench, the learning-rate finder, gradient checks and pictures. It imports every package below it;
only `api` and `cli` import it.
"""
