"""Our Megatron-style training layer on megatron-core (not Megatron-LM's ``megatron.training``).

``megatron`` is a namespace package shared with the installed megatron-core: never add
``megatron/__init__.py``. Entry point: :func:`megatron.training.training.pretrain` (used by
``pretrain_gpt.py``). Map and data flow of one iteration: docs/ARCHITECTURE.md.
"""
