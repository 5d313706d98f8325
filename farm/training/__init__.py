"""Training: the code a runner child process runs for a `train` job (imports torch; producers never import it).

Entry: `farm.training.run.run_training(job, emit)`. One module per concern: data (formats, tokens, loss masks),
packing (rows and batches), model (base + adapter), backend (optimizer seam), loop, checkpoint, integrity,
environment.
"""
