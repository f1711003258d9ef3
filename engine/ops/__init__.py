"""Pure operators: values in, values out. No file, network or bus access here.

The worker composes them in the order a pipeline file gives (``engine.steps``); the
training script uses the same preprocessing so that models see what they were
trained on.
"""
