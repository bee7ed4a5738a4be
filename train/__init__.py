"""Training: state, optimizer, steps (jit / pmap), checkpoints, metrics and the loop.

Entry points: `train.loop.train_and_evaluate(config, workdir)`, `train.loop.evaluate(workdir)`,
`train.checkpoint.load_for_inference(workdir)`. Submodules are imported explicitly (no re-exports
here) so that `import train.checkpoint` stays light for inference-only users.
"""
