"""The model layer: a language model, its MLP neurons, and the prompts it reads.

``loading`` finds and loads a checkpoint by name (``checkpoints`` vets a checkpoint directory
before transformers reads it); ``sites`` finds the neuron vector of every layer and hooks it;
``nodes`` is the one node type, a circuit; ``interventions`` edits nodes during a forward pass;
``data`` turns paired prompts into aligned batches. Nothing here knows about specs or attribution.
"""
