"""Merging an adapter into its base model: the `merge` job kind.

- spec.py     MergeSpec: what `farm merge NAME[:V]` and POST /v1/merges submit
- service.py  submit_merge: checks at the door (the adapter exists, its base is still reachable), records the job
- run.py      run_merge: the runner side (loads the base in 16 bits, applies the adapter with stock PEFT,
              merge_and_unload, save_pretrained as sharded safetensors with the tokenizer)
- card.py     the merged model's metadata.json and README.md (lineage: base + adapter)

A merged model is a catalog entry of kind `merge` (name:version, files with sha256, provenance) and can be the
`base_model: farm:NAME:V` of a later job.
"""
