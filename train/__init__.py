"""Fine-tuning (data, loss, optimizer, step, loop, Orbax checkpoints): not built yet.

The model library does not import this package; see README "What is not supported yet".
"""
