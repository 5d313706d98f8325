"""Training: the code a runner child process runs for a `train` job (imports torch; producers never import it).

Entry: `farm.training.run.run_training(job, emit)`. One module per concern: data (formats, tokens, loss masks),
packing (rows and batches), model (base + adapter), backend (the `Backend` protocol and the choice of one), one
backend a file (torch_backend: one process; deepspeed_backend: ZeRO across several), loop, checkpoint,
integrity, figures (the loss plot and TensorBoard log), cotrain/cotrain_mix (several adapters on one base).
The provenance's environment record is farm.environment, shared by every job kind.
"""
