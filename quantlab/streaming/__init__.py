"""Streaming: models larger than memory quantized, exported and scored one decoder layer at a
time, their weights read lazily from safetensors shards (see docs/streaming.md).

- :mod:`~quantlab.streaming.shards`: a model directory's tensors, checked and read on demand;
- :mod:`~quantlab.streaming.writer`: sharded safetensors output, tensor by tensor;
- :mod:`~quantlab.streaming.export`: the checkpoint directory around those shards, atomically;
- :mod:`~quantlab.streaming.methods`: what RTN and GPTQ do to one decoder layer;
- :mod:`~quantlab.streaming.layerwise`: the walk over the layers (:func:`quantize_streaming`);
- :mod:`~quantlab.streaming.score`: perplexity and divergence over the layers.
"""
