"""Post-training quantization: recipes, methods (RTN, GPTQ, AWQ), packed storage, the block-by-block
job that emits live profiling events, and export/reload.

    from dllm_studio.quant.recipe import QuantRecipe
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.export import save_quantized
"""
