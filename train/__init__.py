"""Training: state, optimizer, steps (jit / pmap), checkpoints, metrics, the loop and sweeps.

Entry points: `solo.train.loop.train_and_evaluate(config, workdir)`,
`solo.train.loop.evaluate(workdir)`, `solo.train.inference.load(workdir)`. Submodules are
imported explicitly (no re-exports here), so loading a workdir for inference stays light.
"""
