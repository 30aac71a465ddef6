"""dsunlearn: machine unlearning for pre-trained causal LMs on DeepSpeed (ZeRO-3, one node or many)."""
__version__ = "0.1.0"
