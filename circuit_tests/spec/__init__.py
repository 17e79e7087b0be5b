"""The spec layer: a YAML claim about circuits, measured on a model and reported.

``schema`` reads and validates a spec; ``subject`` prepares one (spec, model) and measures it
lazily, once, into typed ``Figures``; ``expectations`` checks each claim against the subject;
``baselines`` stores circuits between runs; ``report`` shows results; ``session`` is the one
runner the pytest plugin and the command line both drive.
"""
