"""The D2LLM student: ``backbone`` (base model + LoRA), ``pma`` (pooling), ``iem`` (pair scorer),
``model`` (``D2LLMStudent``: encode, score, save/load). Import the submodules directly; this
package imports nothing heavy so that the CLI stays fast.
"""
