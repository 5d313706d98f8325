"""Extraction jobs: factor a LoRA out of the difference between a fine-tuned model and its base.

One module per concern: `plan` (what to read and factor, torch-free), `svd` (the factorization and its rho
certificate), `peft_format` (keys, config, files peft loads), `extract` (the streaming loop), `run` (the job
entry, `run_extraction(job, emit)`), `validate` (submit-time checks, torch-free). Importing this package stays
light: torch is imported by svd/extract only.
"""
