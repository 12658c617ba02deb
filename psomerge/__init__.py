"""psomerge: merge fine-tuned expert language models by data-driven Particle Swarm Optimization."""

__version__ = "0.1.0"
