"""gptoss-nemo: fine-tune gpt-oss on Megatron-core (import -> BF16 SFT -> ModelOpt QAT -> MXFP4 export)."""

__version__ = "0.1.0"
