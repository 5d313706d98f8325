"""The farm: a training farm for LoRA/QLoRA adapters.

Importing this package (and the CLI, the service layer, the API) never imports torch: producers stay light.
"""

__version__ = "0.1.0"
