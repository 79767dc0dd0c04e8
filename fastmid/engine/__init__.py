"""The engine: what another trainer imports (Mid-Block patching, the LoRA layers, attention for
packed rows, the label-only loss, quantized frozen weights, Liger on frozen blocks, compile
helpers). It imports nothing from :mod:`fastmid.recipe` or :mod:`fastmid.study`."""
